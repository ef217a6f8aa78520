"""Verifies deliveries of the gateway with the official Standard Webhooks
library, as an integrator's receiver would.

Reads a JSON list on stdin, one object per delivery:
  {"secret": "whsec_...", "headers": {"webhook-id": ...}, "body_base64": "..."}
and prints one line per delivery, "ok" or "invalid: <reason>", in order.
Exits 0 when it could check them all (verdicts are in the output).
"""

import base64
import json
import sys

from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError


def verdict(delivery):
    body = base64.b64decode(delivery["body_base64"])
    try:
        # The exact bytes received: never a re-serialised copy.
        Webhook(delivery["secret"]).verify(body, delivery["headers"], json_parse=False)
        return "ok"
    except WebhookVerificationError as error:
        return f"invalid: {error}"


def main():
    for delivery in json.load(sys.stdin):
        print(verdict(delivery))


if __name__ == "__main__":
    main()
