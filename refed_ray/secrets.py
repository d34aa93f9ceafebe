"""Credentials kept out of everything the project writes: run.json, report.json, report.html, logs,
error messages. One place decides what a credential is, by its name and by its shape, and every
writer masks with it (``mask_value`` for settings, ``mask_text`` for text).

A masked setting reads ``***`` where the credential was (a URL keeps its scheme and host); the
masked config still validates, but cannot be used to connect: ``has_masked`` tells a reader so.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

MASK = "***"

# Names whose values are credentials: fsspec's (s3fs key/secret/token, adlfs account_key,
# connection_string, sas_token, credential), HTTP's (Authorization), an FTP/SMB passwd.
_SECRET_NAMES = {
    "key", "secret", "token", "password", "passwd", "pwd", "credential", "credentials", "apikey",
    "authorization", "connection_string", "sas_token", "sas", "sig", "signature", "cookie",
}
_SECRET_SUFFIXES = tuple(f"_{name}" for name in _SECRET_NAMES - {"key"}) + ("_key", "secret_access_key", "-key")

_VALUE = r"[^\s\"',;&}]+"
# What a credential looks like inside a value or a text: an Authorization or api-key header or
# field (the scheme word, e.g. Bearer, kept), an OpenAI-style key, a URL's user:password, the
# key=value parts of an Azure connection string or SAS URL, a password in a query or DSN.
_CREDENTIALS = [
    (re.compile(r"(?i)(\bbearer\s+)[^\s\"',;}]+"), rf"\1{MASK}"),
    (re.compile(r"(?i)(\bauthorization[\"']?\s*[:=]\s*[\"']?(?:(?:bearer|basic|token)\s+)?)[^\s\"',;}]+"),
     rf"\1{MASK}"),
    (re.compile(rf"(?i)(\bapi[-_ ]?key[\"']?\s*[:=]\s*[\"']?){_VALUE}"), rf"\1{MASK}"),
    (re.compile(rf"(?i)(\b(?:accountkey|sharedaccesskey|sharedaccesssignature|sig|password|passwd|pwd|"
                rf"access_token|client_secret|secret|token|sas_token)\s*=\s*){_VALUE}"), rf"\1{MASK}"),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{6,}"), f"sk-{MASK}"),
    (re.compile(r"(://)[^/\s:@]+:[^/\s@]+@"), rf"\1{MASK}@"),
]


def is_secret_name(name: object) -> bool:
    """Keys whose values are credentials (``key``, ``api_key``, ``aws_secret_access_key``,
    ``connection_string``, ``passwd``, ``Authorization``, ...), not ones that merely mention them
    (``api_key_env``, ``max_tokens``)."""
    name = str(name).lower()
    return name in _SECRET_NAMES or name.endswith(_SECRET_SUFFIXES)


def mask_text(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every credential in it masked: the values in ``secrets`` (the run's API key)
    wherever they appear, and anything shaped like a credential. Applied wherever an API's answer
    becomes text the project logs, raises or stores: servers and proxies may echo the headers
    they were sent."""
    for secret in secrets:
        if len(secret) >= 4:  # a shorter "key" is a placeholder; masking it would garble the text
            text = text.replace(secret, MASK)
    for pattern, mask in _CREDENTIALS:
        text = pattern.sub(mask, text)
    return text


def mask_value(value: Any) -> Any:
    """A config (or any JSON-like value) with its credentials masked: the whole value of a key
    named like one, and the credential parts of every string (a URL's password, AccountKey=...)."""
    if isinstance(value, dict):
        return {k: MASK if is_secret_name(k) and v else mask_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [mask_value(v) for v in value]
    if isinstance(value, str):
        return mask_text(value)
    return value


def has_masked(value: Any) -> bool:
    """Whether a value read back from run.json lost a credential to masking (it cannot connect)."""
    if isinstance(value, dict):
        return any(has_masked(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(has_masked(v) for v in value)
    return isinstance(value, str) and MASK in value
