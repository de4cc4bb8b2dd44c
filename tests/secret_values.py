"""Secret values for the tests that check secrets never leave the process: every secret the
enricher can be given (each value unique, so that a leak is unambiguous), the environment that
sets them all, and the search for any of them in output. Used by ``tests/unit/test_secrets.py``
and ``tests/integration/test_secrets_in_logs.py``."""

from __future__ import annotations

# Every secret the enricher can be given, each value unique so that a leak is unambiguous.
SALT = "salt-Qx81vZ"
SESSION_API_TOKEN = "token-Wd39pLk2Rt7yUe4s"
REDIS_USER = "ruser-Fj27nB"
REDIS_PASSWORD = "rpass-Hk58cM"
REDIS_QUERY_PASSWORD = "rqpass-Lp93dN"
REGISTRY_USER = "guser-Zs64eQ"
REGISTRY_PASSWORD = "gpass-Vb15fR"
REGISTRY_TOKEN = "gtoken-Nm72gS"
# librdkafka properties that hold a secret, all accepted with security.protocol PLAINTEXT
# without changing what the client does.
KAFKA_SECRETS = {
    "sasl.password": "kpass-Ty48hU",
    "ssl.key.password": "kkeypass-Ui26jV",
    "ssl.keystore.password": "kstorepass-Oa83kW",
    "ssl.key.pem": "-----BEGIN PRIVATE KEY-----kpem-Pe51lX-----END PRIVATE KEY-----",
    "sasl.oauthbearer.client.secret": "kclient-Sd97mY",
    "sasl.oauthbearer.client.credentials.client.secret": "kcredsecret-Df34nZ",
    "sasl.oauthbearer.config": "principal=kprincipal-Gh62pA scope=kscope-Jk19qB",
    "sasl.oauthbearer.assertion.private.key.passphrase": "kphrase-Kl75rC",
    "sasl.oauthbearer.assertion.private.key.pem": "kassertpem-Zx28sD",
}
SECRETS = [
    SALT,
    SESSION_API_TOKEN,
    REDIS_USER,
    REDIS_PASSWORD,
    REDIS_QUERY_PASSWORD,
    REGISTRY_USER,
    REGISTRY_PASSWORD,
    REGISTRY_TOKEN,
    *KAFKA_SECRETS.values(),
    "kprincipal-Gh62pA",
]


def kafka_variable(name: str) -> str:
    return "ENRICHER_KAFKA_" + name.upper().replace(".", "_")


def secret_env(
    redis_host: str = "127.0.0.1:1", bootstrap: str = "127.0.0.1:1", redis_db: str = "0"
) -> dict[str, str]:
    """Settings with every secret set (the Redis URL carries a password in its userinfo and
    another in its query; redis-py uses the userinfo's)."""
    return {
        "ENRICHER_BOOTSTRAP_SERVERS": bootstrap,
        "ENRICHER_INPUT_TOPIC": "secrets-in",
        "ENRICHER_OUTPUT_TOPIC": "secrets-out",
        "ENRICHER_DLQ_TOPIC": "secrets-dlq",
        "ENRICHER_SALT": SALT,
        "ENRICHER_SESSION_API_RENEW": "true",
        "ENRICHER_SESSION_API_TOKEN": SESSION_API_TOKEN,
        "ENRICHER_REDIS_URL": (
            f"redis://{REDIS_USER}:{REDIS_PASSWORD}@{redis_host}/{redis_db}"
            f"?password={REDIS_QUERY_PASSWORD}"
        ),
        "ENRICHER_SCHEMA_REGISTRY_URL": (
            f"https://{REGISTRY_USER}:{REGISTRY_PASSWORD}@registry:8081/?token={REGISTRY_TOKEN}"
        ),
        "ENRICHER_KAFKA_SASL_USERNAME": "kafka-user",
        **{kafka_variable(name): value for name, value in KAFKA_SECRETS.items()},
    }


def leaked(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text]


# -- the rule for librdkafka property names -------------------------------------------------

# Every property of librdkafka 2.16 (rd_kafka_conf_properties_show, plus the hidden ones the
# library accepts) whose name contains password, secret, passphrase, config, conf, key, token,
# pem or cred, with whether it holds a secret.
