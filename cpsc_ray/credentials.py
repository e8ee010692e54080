"""Secrets are never written. Storage credentials come from the environment or the machine's role: pyarrow's S3
filesystem reads AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN (GCS: GOOGLE_APPLICATION_CREDENTIALS).
A location is recorded wherever a run goes (setup.json, lineage, Tune's experiment state, logs, a job's entrypoint),
and a job's environment is shown by the dashboard and ``ray job list``, so a URI or a job variable that carries a
secret is refused, with a one-line error that never repeats the secret."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlsplit

from cpsc_ray.errors import InputError

# Query keys and variable names that hold a secret: an S3 key pair or session token, an API key, a SAS token.
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_KEY|API_KEY|_KEY$|^KEY$|SAS", re.IGNORECASE)
FROM_THE_ENVIRONMENT = (
    "give credentials to every node's environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN; "
    "GOOGLE_APPLICATION_CREDENTIALS for gs://) or use the nodes' instance role"
)


def redacted(uri: str) -> str:
    """The URI with its user information and query values hidden: what an error message may show."""
    address = urlsplit(uri)
    host = address.netloc.rpartition("@")[2]
    user = "***@" if "@" in address.netloc else ""
    query = "&".join(f"{key}=***" for key, _ in parse_qsl(address.query)) if address.query else ""
    return f"{address.scheme}://{user}{host}{address.path}" + (f"?{query}" if query else "")


def refuse_credentials(uri: str, what: str) -> None:
    """Raise an InputError when the URI carries a secret: a password in its user information (s3://KEY:SECRET@bucket)
    or a query key that names one (?secret_key=..., ?sas_token=...). ``what`` names the option, for the message."""
    address = urlsplit(uri)
    userinfo = address.netloc.rpartition("@")[0] if "@" in address.netloc else ""
    secret_keys = [key for key, _ in parse_qsl(address.query) if SECRET_NAME.search(key)]
    if ":" in userinfo or (userinfo and address.scheme == "s3") or secret_keys:
        where = f"the query key {secret_keys[0]}" if secret_keys else "its user information"
        raise InputError(
            f"{what} {redacted(uri)}: the location carries a credential in {where}, and a location is recorded in "
            f"results, Tune's state and logs; drop it from the URI and {FROM_THE_ENVIRONMENT}"
        )


def refuse_secret_variables(names: list[str], what: str) -> None:
    """Raise an InputError naming the first variable that holds a secret, for a job's environment (``what``)."""
    secret = [name for name in names if SECRET_NAME.search(name)]
    if secret:
        raise InputError(
            f"{what} {secret[0]}: a job's environment is shown by the dashboard and `ray job list`, so it must hold no "
            f"secret; set it in the nodes' own environment instead (launch/cluster.yaml's setup, or a Kubernetes "
            f"Secret in launch/rayjob.yaml), where the job's processes inherit it"
        )
