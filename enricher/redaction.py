"""Secrets kept out of logs and errors: which values are secret, and how they are masked.

A secret is found by rule, not by list: a librdkafka property by its name
(:func:`is_secret_kafka_key`), a URL's credentials by where they sit in it (:func:`redact_url`).
What cannot be masked in place, an error message from a client library, is scrubbed of every
secret value it may echo (:func:`scrub`).
"""

from __future__ import annotations

import re
from urllib.parse import unquote_plus

MASK = "***"
# librdkafka property names (split on "." and "_") with a word containing one of these hold a
# secret; so does one with the word "key" (ssl.key.pem, ssl_key), unless its last word says
# it holds where the secret is (a file path or a URL), not the secret: see is_secret_kafka_key.
_SECRET_KAFKA_WORDS = ("password", "secret", "passphrase", "config", "token")
_LOCATION_WORDS = ("location", "file", "url")
# URL query parameters whose name contains one of these (any case) hold a credential.
_SECRET_QUERY_WORDS = ("pass", "pwd", "secret", "token", "key", "auth", "cred", "user")


def scrub(text: str, secrets: list[str]) -> str:
    """``text`` with each secret of 4 characters or more masked, longest first (a shorter
    one is no secret worth keeping, and masking it would garble the text)."""
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 4:
            text = text.replace(secret, MASK)
    return text


def is_secret_kafka_key(name: str) -> bool:
    """Whether the librdkafka property ``name`` holds a secret, by rule.

    The name is split into words at ``.`` and ``_``, in lower case. If its last word is
    ``location``, ``file`` or ``url``, its value says where something is (a file path, an
    endpoint), not a secret: not secret. Otherwise it is secret when a word contains
    ``password``, ``secret``, ``passphrase``, ``config`` or ``token``, or a word is exactly
    ``key``. Secret: ``ssl.key.password``, ``ssl.key.pem``, ``ssl_key``,
    ``ssl.keystore.password``, ``sasl.password``, ``sasl.jaas.config``,
    ``sasl.oauthbearer.config``, ``sasl.oauthbearer.client.secret``,
    ``sasl.oauthbearer.assertion.private.key.passphrase`` and ``...private.key.pem``. Not
    secret: ``ssl.key.location``, ``ssl.keystore.location`` (``keystore`` is not the word
    ``key``), ``sasl.kerberos.keytab`` (a path), ``...private.key.file``,
    ``sasl.oauthbearer.token.endpoint.url`` (shown through :func:`redact_url`),
    ``ssl.ca.pem``, ``ssl.certificate.pem`` (certificates are public), ``sasl.username``.
    """
    words = re.split(r"[._]", name.lower())
    if words[-1] in _LOCATION_WORDS:
        return False
    return "key" in words or any(s in word for word in words for s in _SECRET_KAFKA_WORDS)


def _is_url_property(name: str) -> bool:
    return re.split(r"[._]", name.lower())[-1] == "url"


def redact_kafka_property(name: str, value: str) -> str:
    """The librdkafka property's ``value`` fit for a log line: ``***`` if
    :func:`is_secret_kafka_key` calls it secret, through :func:`redact_url` if its name ends
    in ``url``, else as it is."""
    if is_secret_kafka_key(name):
        return MASK
    if _is_url_property(name):
        return redact_url(value)
    return value


def kafka_property_secrets(name: str, value: str) -> list[str]:
    """The secrets :func:`redact_kafka_property` masks in the property's ``value``."""
    if is_secret_kafka_key(name):
        return [value]
    if _is_url_property(name):
        return url_redaction(value)[1]
    return []


def redact_url(url: str) -> str:
    """``url`` with its credentials masked: ``redis://user:pw@host/0?password=pw`` ->
    ``redis://***:***@host/0?password=***``.

    Everything between ``://`` and the last ``@`` is the userinfo: user and password are both
    masked (a raw ``@``, ``/``, ``?`` or ``#`` in a password cannot leak a part of it). In the
    query, the value of every parameter whose name contains ``pass``, ``pwd``, ``secret``,
    ``token``, ``key``, ``auth``, ``cred`` or ``user`` (any case) is masked, and a fragment
    is masked whole. Works on text, so a malformed URL is redacted too; never raises.
    """
    return url_redaction(url)[0]


def url_redaction(url: str) -> tuple[str, list[str]]:
    """(``url`` redacted, the secrets masked in it, raw and percent-decoded)."""
    start = url.find("://")
    start = 0 if start < 0 else start + 3
    head, rest = url[:start], url[start:]
    secrets: list[str] = []
    userinfo, at, rest = rest.rpartition("@")
    if at:
        user, colon, password = userinfo.partition(":")
        secrets += [userinfo, user, password]
        head += (MASK if user else "") + colon + (MASK if password else "") + at
    rest, hash_mark, fragment = rest.partition("#")
    if fragment:
        secrets.append(fragment)
        fragment = MASK
    rest, question_mark, query = rest.partition("?")
    params = []
    for param in query.split("&") if query else []:
        name, equals, value = param.partition("=")
        if value and any(word in unquote_plus(name).lower() for word in _SECRET_QUERY_WORDS):
            secrets.append(value)
            value = MASK
        params.append(name + equals + value)
    redacted = head + rest + question_mark + "&".join(params) + hash_mark + fragment
    both = (s for secret in secrets for s in (secret, unquote_plus(secret)) if s)
    return redacted, list(dict.fromkeys(both))
