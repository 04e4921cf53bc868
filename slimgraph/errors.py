"""One exception hierarchy. Every message names the file, node, op, opset or pass involved
and says what to do; the CLI prints it on one line and exits 2 for bad input."""

from __future__ import annotations


class SlimgraphError(Exception):
    """Base of every error slimgraph raises on purpose."""

    exit_code = 1


class ModelLoadError(SlimgraphError):
    """The model file/bytes/module could not be read or converted."""

    exit_code = 2


class UnsupportedOpError(SlimgraphError):
    """An op or domain that a runtime or pass cannot handle."""

    exit_code = 2


class PipelineError(SlimgraphError):
    """The pipeline is invalid: unknown pass, bad config, missing data or extra, bad order."""

    exit_code = 2


class PassError(SlimgraphError):
    """A pass failed or broke its contract while running."""

    exit_code = 1

    def __init__(self, pass_name: str, message: str):
        super().__init__(f"pass {pass_name!r}: {message}")
        self.pass_name = pass_name


class DataError(SlimgraphError):
    """Input data (.npz, arrays) does not fit the model."""

    exit_code = 2
