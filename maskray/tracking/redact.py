"""Keeping credentials out of MLflow params, tags and log lines.

Credentials reach maskray through the environment (``AWS_SECRET_ACCESS_KEY``, ``MLFLOW_TRACKING_PASSWORD``,
``MLFLOW_TRACKING_TOKEN``, ``GOOGLE_APPLICATION_CREDENTIALS``, ...) and must stay there. :func:`redact_params`
runs over everything the driver logs as params and tags: a key whose last part names a secret (``secret``,
``token``, ``password``, ``access_key``, ...) gets ``***`` as its value, the password of a
``scheme://user:password@host`` URI becomes ``***``, and so does any occurrence of the value of a secret-named
environment variable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "***"
SECRET_WORDS = ("secret", "token", "password", "passwd", "credential", "private_key", "access_key", "api_key",
                "apikey", "session_key")
_URI_PASSWORD = re.compile(r"(://[^/:@\s]+):[^/@\s]+@")
_MIN_SECRET_LENGTH = 4  # shorter env values ("1", "on") would blank out ordinary params


def is_secret_name(name: str) -> bool:
    """True for names such as ``AWS_SECRET_ACCESS_KEY``, ``api_token``, ``db.password``, ``apiToken``,
    ``GOOGLE_APPLICATION_CREDENTIALS``: a secret word (or its plural) as whole parts of the name, case-insensitive,
    so that ``TOKENIZERS_PARALLELISM`` (set to ``false`` by tokenizer libraries) is not one."""
    parts = re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower())
    joined = "_" + "_".join(filter(None, parts)) + "_"
    return any(f"_{word}_" in joined or f"_{word}s_" in joined for word in SECRET_WORDS)


def redact_uri_credentials(text: str) -> str:
    """``https://user:pw@host/x`` -> ``https://user:***@host/x`` (every URI in ``text``)."""
    return _URI_PASSWORD.sub(rf"\1:{REDACTED}@", text)


def secret_env_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """The values of the set environment variables with secret names, longest first."""
    environ = os.environ if environ is None else environ
    values = {value for key, value in environ.items() if is_secret_name(key) and len(value) >= _MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def redact_params(params: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``params`` (flattened ``a.b.c`` keys, e.g. params or tags) with secrets replaced by ``***``; values that
    hold none are returned unchanged (same type)."""
    secrets = secret_env_values(environ)
    out: dict[str, Any] = {}
    for key, value in params.items():
        if is_secret_name(key.rsplit(".", 1)[-1]) and value not in (None, ""):
            out[key] = REDACTED
            continue
        text = redact_uri_credentials(str(value))
        for secret in secrets:
            text = text.replace(secret, REDACTED)
        out[key] = value if text == str(value) else text
    return out
