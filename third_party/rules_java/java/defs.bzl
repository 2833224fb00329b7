"""Offline stand-in for @rules_java//java:defs.bzl.

@bazel_tools loads these symbols even for a C++-only build; without this local repository
Bazel 4.2.3 tries to download rules_java. One-line wrappers over the native rules suffice.
"""

def java_import(**kwargs):
    native.java_import(**kwargs)

def java_runtime(**kwargs):
    native.java_runtime(**kwargs)

def java_toolchain(**kwargs):
    native.java_toolchain(**kwargs)

def java_library(**kwargs):
    native.java_library(**kwargs)

def java_binary(**kwargs):
    native.java_binary(**kwargs)
