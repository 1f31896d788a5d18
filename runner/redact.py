"""What kmrun must never log, and the one ``Redactor`` every string passes through.

A key names a secret by its words (``db_password``, ``api.token``, ``apiKey``); a value is
secret when it sits under such a key, in the Kedro project's credentials, in a
secret-named environment variable, or in a URL's password.
"""

from __future__ import annotations

import logging
import os
import re
import traceback
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value
TRUNCATED = "…[truncated; the full value is in the config.yaml artifact]"
REDACTED = "***"
# A key names a secret when one of its segments (split at dots, _, - and camelCase) is one
# of these words, or two neighbouring segments form one of the pairs: `db_password`,
# `api.token`, `apiKey`, `client_secret`. Not `tokenizer` or `max_tokens` (a count).
SECRET_WORDS = frozenset({
    "password", "passwords", "passwd", "pwd", "passphrase", "pass", "secret", "secrets", "token", "tokens",
    "credential", "credentials", "creds", "cookie", "cookies", "dsn", "auth", "apikey", "pin",
})
SECRET_PAIRS = frozenset({("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key"),
                          ("session", "key"), ("signing", "key"), ("conn", "str"), ("connection", "string")})
COUNTS = frozenset({"max", "min", "num", "n", "total", "count", "top", "per", "limit", "size"})
COMMON_VALUES = frozenset({"true", "false", "none", "null", "yes", "no", "on", "off"})
NOT_SECRET_ENV = frozenset({"PWD", "OLDPWD"})  # the shell's working folders: "pwd" here is not a password
MIN_SECRET_LENGTH = 4  # shorter values (and COMMON_VALUES) would redact half of every text


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"C": 1}}`` → ``{"model.C": 1}``. Lists and scalars are leaves."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def segments(key: str) -> list[str]:
    """``service.apiToken_v2`` → ``["service", "api", "token", "v", "2"]``."""
    return [w.lower() for w in re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+", key)]


def is_secret_name(key: str) -> bool:
    """Whether a (dotted) key names a secret: ``db_password``, ``api.token``, ``apiKey``…"""
    words = segments(key)
    for i, word in enumerate(words):
        near = {words[i - 1] if i else "", words[i + 1] if i + 1 < len(words) else ""}
        if word in SECRET_WORDS and not (word.startswith("token") and near & COUNTS):
            return True
        if i and (words[i - 1], word) in SECRET_PAIRS:
            return True
    return False


def url_password(url: str | None) -> str | None:
    """The password in ``scheme://user:password@host/...``, if any."""
    from urllib.parse import urlsplit

    if not url or "@" not in url:
        return None
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def _leaves(tree: Any) -> list[Any]:
    """Every scalar in a nested dict/list."""
    if isinstance(tree, Mapping):
        return [leaf for value in tree.values() for leaf in _leaves(value)]
    if isinstance(tree, (list, tuple)):
        return [leaf for value in tree for leaf in _leaves(value)]
    return [tree]


class Redactor:
    """Removes secrets from what kmrun logs: values of secret-named keys, every
    credential value of the Kedro project, and secret-named environment variables."""

    def __init__(self, secret_values: Iterable[Any] = ()) -> None:
        values = {str(v) for v in secret_values if v is not None and not isinstance(v, bool)}
        kept = (v for v in values if len(v) >= MIN_SECRET_LENGTH and v.lower() not in COMMON_VALUES)
        self.values = sorted(kept, key=len, reverse=True)

    @classmethod
    def for_project(cls, credentials: Mapping[str, Any], params: Mapping[str, Any],
                    urls: Iterable[str | None] = ()) -> Redactor:
        """Every credential value, every value under a secret-named parameter (strings,
        numbers and list items), secret-named environment variables, and the passwords
        in ``urls`` (the tracking URI, the study storage)."""
        secrets = _leaves(credentials)
        secrets += [v for k, v in os.environ.items() if is_secret_name(k) and k not in NOT_SECRET_ENV]
        secrets += [leaf for k, v in flatten(params).items() if is_secret_name(k) for leaf in _leaves(v)]
        secrets += [url_password(url) for url in urls]
        return cls(secrets)

    @classmethod
    def union(cls, redactors: Iterable[Redactor]) -> Redactor:
        """One redactor for many jobs (a sweep whose cells hold different secrets)."""
        return cls(value for redactor in redactors for value in redactor.values)

    @contextmanager
    def logs(self) -> Iterator[None]:
        """For the block, every log record any handler emits (Kedro's "Node ... failed
        with error: ..." among them) passes this redactor first."""
        if not self.values:
            yield
            return
        gate = _RedactRecords(self)
        handlers = {*logging.root.handlers, *(h for logger in list(logging.root.manager.loggerDict.values())
                                              for h in getattr(logger, "handlers", []))}
        for handler in handlers:
            handler.addFilter(gate)
        try:
            yield
        finally:
            for handler in handlers:
                handler.removeFilter(gate)

    def override(self, line: str) -> str:
        """``params.db_password=x`` → ``params.db_password=***``; other values text-redacted."""
        key, sep, _ = line.partition("=")
        if sep and is_secret_name(key.lstrip("+~")):
            return f"{key}={REDACTED}"
        return self.text(line)

    def text(self, text: str) -> str:
        for value in self.values:
            text = text.replace(value, REDACTED)
        return text

    def tree(self, tree: Any, key: str = "") -> Any:
        """A copy of a nested dict/list with secret-named keys and secret values hidden."""
        if key and is_secret_name(key) and not isinstance(tree, (dict, list)):
            return REDACTED if tree is not None else None
        if isinstance(tree, Mapping):
            return {k: self.tree(v, f"{key}.{k}" if key else str(k)) for k, v in tree.items()}
        if isinstance(tree, list):
            return [self.tree(v, key) for v in tree]
        return self.text(tree) if isinstance(tree, str) else tree

    def params(self, flat: Mapping[str, Any]) -> dict[str, str]:
        """Flat params as MLflow strings: redacted, and cut to MLflow's length limit."""
        out = {}
        for key, value in flat.items():
            text = REDACTED if is_secret_name(key) and value is not None else self.text(str(value))
            if len(text) > MAX_PARAM_VALUE:
                text = text[: MAX_PARAM_VALUE - len(TRUNCATED)] + TRUNCATED
            out[key] = text
        return out


class _RedactRecords(logging.Filter):
    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = self.redactor.text(message)
        if record.exc_info and record.exc_info[1] is not None:  # the traceback is printed from the exception
            shown = "".join(traceback.format_exception(*record.exc_info))
            if self.redactor.text(shown) != shown:
                clean, record.exc_info, record.exc_text = f"{clean}\n{self.redactor.text(shown)}", None, None
        if clean != message:
            record.msg, record.args = clean, ()
        return True


def hide_password(url: str) -> str:
    """``postgresql://u:secret@h/db`` → ``postgresql://u:***@h/db``."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
