"""Greengrass v2 and STS under botocore's Stubber, for the publish, deploy and core-device tests.

moto has no Greengrass v2, so its calls are stubbed: every request is validated against the
service model and compared with the parameters a test expects, in order.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

import boto3
from botocore.stub import Stubber
from conftest import AWS_TEST_ENV

REGION, ACCOUNT = "us-east-1", "123456789012"
NOW = datetime(2025, 1, 1, tzinfo=timezone.utc)


def arn(name: str, version: str | None = None) -> str:
    base = f"arn:aws:greengrass:{REGION}:{ACCOUNT}:components:{name}"
    return f"{base}:versions:{version}" if version else base


def client(service: str, **kwargs):
    return boto3.Session(aws_access_key_id=AWS_TEST_ENV["AWS_ACCESS_KEY_ID"], region_name=REGION,
                         aws_secret_access_key=AWS_TEST_ENV["AWS_SECRET_ACCESS_KEY"]).client(service, **kwargs)


class Captured:
    """Matches any value in a Stubber's expected parameters and keeps it, to check it separately."""

    def __init__(self):
        self.values = []

    def __eq__(self, other):
        self.values.append(other)
        return True


class JsonOf:
    """Matches a JSON string that decodes to exactly ``doc`` (whatever its formatting)."""

    def __init__(self, doc):
        self.doc = doc

    def __eq__(self, other):
        return isinstance(other, str) and json.loads(other) == self.doc

    def __repr__(self):
        return f"JsonOf({self.doc!r})"


class FakeSession:
    def __init__(self, **clients):
        self.clients, self.region_name = clients, REGION

    def client(self, name, region_name=None):
        assert region_name in (None, REGION)
        return self.clients[name]

    def get_partition_for_region(self, region):
        assert region == REGION
        return "aws"


class GreengrassStub:
    """Stubbed greengrassv2 and sts clients, and a fake session over them (plus an S3 client)."""

    def __init__(self):
        self.gg, self.sts = client("greengrassv2"), client("sts")
        self.gg_stub, self.sts_stub = Stubber(self.gg), Stubber(self.sts)
        self.gg_stub.activate()
        self.sts_stub.activate()
        self.recipes = Captured()  # the inlineRecipe of every create_component_version
        self.deployments: list[dict] = []  # every create_deployment request, as sent
        self.gg.meta.events.register("before-parameter-build.greengrassv2.CreateDeployment",
                                     lambda params, **_: self.deployments.append(json.loads(json.dumps(params))))

    def session(self, s3=None, accounts: int = 1) -> FakeSession:
        """A session whose STS answers ``accounts`` GetCallerIdentity calls (publish and deploy ask once each)."""
        for _ in range(accounts):
            self.sts_stub.add_response("get_caller_identity", {"Account": ACCOUNT}, {})
        return FakeSession(greengrassv2=self.gg, sts=self.sts, s3=s3)

    def sent_recipes(self) -> dict[tuple[str, str], str]:
        """The recipes sent to create_component_version, by (component, version)."""
        import yaml

        docs = [(yaml.safe_load(r), r.decode()) for r in self.recipes.values]
        return {(d["ComponentName"], d["ComponentVersion"]): text for d, text in docs}

    def expect(self, op: str, response: dict, **params):
        self.gg_stub.add_response(op, response, params)

    def missing(self, op: str, **params):
        self.gg_stub.add_client_error(op, "ResourceNotFoundException", http_status_code=404, expected_params=params)

    def pages(self, op: str, key: str, pages: list[list], **params):
        """A paginated listing: every page but the last carries a nextToken the next request sends back."""
        for i, items in enumerate(pages):
            token = {"nextToken": f"t{i + 1}"} if i + 1 < len(pages) else {}
            self.expect(op, {key: items, **token}, **params, **({"nextToken": f"t{i}"} if i else {}))

    def versions(self, name: str, pages: list[list[str]]):
        items = [[{"componentName": name, "componentVersion": v, "arn": arn(name, v)} for v in page] for page in pages]
        self.pages("list_component_versions", "componentVersions", items, arn=arn(name))

    def described(self, name: str, version: str, state: str = "DEPLOYABLE", message: str = ""):
        status = {"componentState": state, **({"message": message} if message else {})}
        self.expect("describe_component", {"arn": arn(name, version), "componentName": name,
                                           "componentVersion": version, "status": status}, arn=arn(name, version))

    def created(self, name: str, version: str, states=("DEPLOYABLE",), message: str = ""):
        self.expect("create_component_version", {"arn": arn(name, version), "componentName": name,
                                                 "componentVersion": version, "creationTimestamp": NOW,
                                                 "status": {"componentState": "REQUESTED"}},
                    inlineRecipe=self.recipes)
        for state in states:
            self.described(name, version, state, message)
