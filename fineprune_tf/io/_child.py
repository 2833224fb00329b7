"""Entry point of the trial-load child process (see :mod:`fineprune_tf.io.sandbox`)."""

import json
import os
import resource
import sys


def _limit(kind: int, value: int) -> None:
    soft, hard = resource.getrlimit(kind)
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(kind, (value, value))


def main() -> None:
    request = json.loads(sys.argv[1])
    _limit(resource.RLIMIT_AS, request["memory_bytes"])
    _limit(resource.RLIMIT_FSIZE, request["file_bytes"])
    _limit(resource.RLIMIT_CORE, 0)
    try:
        from fineprune_tf.io import loader

        loader.load_private_copy(request["kind"], request["path"], request["allow_unsafe"],
                                 request["compile"])
        result = {"ok": True}
    except BaseException as error:  # noqa: BLE001  (everything is reported to the parent)
        result = {"ok": False, "type": type(error).__name__, "message": str(error)[:2000]}
    sys.stdout.write("FINEPRUNE_LOAD_RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: nothing of the model may run after the report


if __name__ == "__main__":
    main()
