"""fsio.describe_error: one line for a storage error, however it arrives: botocore's own error, an
s3fs error raised from it, or the text of a Spark task's failure; None for anything else (the CLI
then shows the traceback)."""
from __future__ import annotations

import botocore.exceptions as bexc

from retrieval import fsio
from retrieval.cli import clear_error


def _raised_from(outer: Exception, inner: Exception) -> Exception:
    try:
        try:
            raise inner
        except Exception as e:
            raise outer from e
    except Exception as e:
        return e


def test_botocore_errors_and_their_wrappers():
    msg = fsio.describe_error(bexc.NoCredentialsError())
    assert msg.startswith("no S3 credentials found (Unable to locate credentials): set AWS_ACCESS_KEY_ID")
    refused = bexc.ClientError({"Error": {"Code": "SignatureDoesNotMatch", "Message": "..."}}, "HeadObject")
    wrapped = _raised_from(PermissionError("Forbidden"), refused)          # what s3fs raises
    assert "SignatureDoesNotMatch: the secret key does not match" in fsio.describe_error(wrapped)
    assert clear_error(wrapped).startswith("Forbidden: S3 refused the request (SignatureDoesNotMatch")
    down = bexc.EndpointConnectionError(endpoint_url="http://127.0.0.1:1/b/k")
    assert "cannot reach the storage endpoint" in fsio.describe_error(_raised_from(OSError("x"), down))
    assert fsio.describe_error(ValueError("a bad value")) is None
    assert fsio.describe_error(bexc.ClientError({"Error": {"Code": "SlowDown"}}, "GetObject")) is None


def test_spark_task_failure_text_and_one_line():
    text = ("An error occurred while calling o123.collectToPython.\n: org.apache.spark.SparkException: Job aborted"
            "\n  File \"/x/botocore/auth.py\", line 432, in add_auth\n    raise NoCredentialsError()\n"
            "botocore.exceptions.NoCredentialsError: Unable to locate credentials\n\tat org.apache...")
    msg = clear_error(RuntimeError(text))
    assert msg.startswith("no S3 credentials found in a Spark task (Unable to locate credentials)") and "\n" not in msg
    assert clear_error(RuntimeError("something else broke")) is None
    assert clear_error(ValueError("line one\n  line two")) == "line one line two"
