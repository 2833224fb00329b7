"""Offline stand-in for @rules_cc//cc:defs.bzl.

Bazel 4.2.3 (Debian's bazel-bootstrap) loads @rules_cc from @bazel_tools and would download it;
Debian's bazel-rules-cc package is too new for it (no use_cpp_toolchain). These one-line
wrappers over the native rules are all that the build and @bazel_tools need.
"""

def cc_binary(**kwargs):
    native.cc_binary(**kwargs)

def cc_library(**kwargs):
    native.cc_library(**kwargs)

def cc_test(**kwargs):
    native.cc_test(**kwargs)

def cc_import(**kwargs):
    native.cc_import(**kwargs)

def cc_toolchain(**kwargs):
    native.cc_toolchain(**kwargs)

def cc_toolchain_suite(**kwargs):
    native.cc_toolchain_suite(**kwargs)
