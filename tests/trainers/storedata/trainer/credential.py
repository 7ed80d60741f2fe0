"""On an OpenStack node: shows what the node's store credential (rclone's config) reaches, for the test to try later.

Reads /etc/cloudml-os/store/rclone.conf, takes a token with the application credential, lists the project's
container (allowed) and the account (refused by the credential's access rules), and prints ``CREDENTIAL
{json}`` with the id, the secret and the token, so that the test can show that none of them works once the
job has ended. A test-only trainer: a real one has no reason to print its credentials.
"""

from __future__ import annotations

import argparse
import configparser
import json
import urllib.error
import urllib.request

CONFIG = "/etc/cloudml-os/store/rclone.conf"


def status(url: str, token: str) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"X-Auth-Token": token}), timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--container", required=True)
    parser.add_argument("--job-dir")
    args = parser.parse_args()
    config = configparser.ConfigParser()
    config.read(CONFIG)
    store = config["store"]
    body = {"auth": {"identity": {"methods": ["application_credential"], "application_credential": {
        "id": store["application_credential_id"], "secret": store["application_credential_secret"]}}}}
    request = urllib.request.Request(store["auth"].rstrip("/") + "/auth/tokens", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        token = response.headers["X-Subject-Token"]
    account = store["storage_url"].rstrip("/")
    print("CONTAINER", status(f"{account}/{args.container}", token), flush=True)
    print("ACCOUNT", status(account, token), flush=True)
    print("CREDENTIAL " + json.dumps({"id": store["application_credential_id"], "token": token,
                                      "secret": store["application_credential_secret"]}), flush=True)


if __name__ == "__main__":
    main()
