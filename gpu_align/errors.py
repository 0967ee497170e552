"""Errors of gpu_align's stages. Each is a :class:`packer.errors.UserError`, so that every command prints it as one
line (``gpu-align: error: ...``), never a traceback: this module is the one place gpu_align meets the packer's
error type, and the stages (decode, detect, align, pipeline) import their errors from here."""

from packer.errors import UserError


class DeviceError(UserError):
    """The device asked for is not there (no CUDA, ``cuda:N`` beyond the visible devices) or ran out of memory."""


class DetectorError(UserError):
    """A detector cannot be built: its weights or optional package are missing, or an option is out of range."""


class DecoderError(UserError):
    """A decoder cannot be built: an unknown kind, or DALI missing or unable to start."""


__all__ = ["DecoderError", "DetectorError", "DeviceError", "UserError"]
