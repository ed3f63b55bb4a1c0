"""The server image's HEALTHCHECK: GET /api/v1/health on the container's own port answers 200.

Plain HTTP first, then HTTPS (a server with `tls.cert_file` set): the check talks to itself over loopback, so
the certificate is not verified here (its name is the public one, not 127.0.0.1); nodes and clients verify it.
VFED_HEALTH_PORT overrides the port (default 7600).
"""

import http.client
import os
import ssl
import sys

PORT = int(os.environ.get("VFED_HEALTH_PORT", "7600"))


def answers(tls: bool) -> bool:
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            "127.0.0.1", PORT, timeout=5, context=context
        )
    else:
        conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=5)
    try:
        conn.request("GET", "/api/v1/health")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


sys.exit(0 if answers(tls=False) or answers(tls=True) else 1)
