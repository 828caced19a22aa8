"""Serving: the continuous-batching engine and the OpenAI-compatible HTTP API."""

from .engine import CANCELLED, ERROR, LENGTH, STOP, Engine, EngineBusy, Request, UnknownAdapter

__all__ = [
    "CANCELLED",
    "ERROR",
    "LENGTH",
    "STOP",
    "Engine",
    "EngineBusy",
    "Request",
    "UnknownAdapter",
]
