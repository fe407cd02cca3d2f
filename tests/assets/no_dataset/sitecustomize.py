"""Put on PYTHONPATH of a SuperNode in tests: every Python process it starts (the SuperNode, its
ClientApps, the training worker) fails to open any file under $FEDMLLM_TEST_ABSENT, as on a site
that holds no copy of the dataset there."""

import builtins
import io
import os

_ABSENT = os.path.realpath(os.environ["FEDMLLM_TEST_ABSENT"]) + os.sep
_open = builtins.open


def _guarded_open(file, *args, **kwargs):
    if isinstance(file, (str, bytes, os.PathLike)) and os.path.realpath(os.fsdecode(file)).startswith(_ABSENT):
        raise FileNotFoundError(f"this site holds no copy of {_ABSENT}: {os.fsdecode(file)}")
    return _open(file, *args, **kwargs)


builtins.open = io.open = _guarded_open
