"""The one exception type users of tvm_patdnn catch.

Every failure caused by the user's input (files, models, targets, options) is raised as a
:class:`PatDNNError` with a message naming the problem, so that callers never have to read a
traceback from deep inside TVM or ONNX.
"""


class PatDNNError(Exception):
    """A problem with the user's input or request, described in plain words."""
