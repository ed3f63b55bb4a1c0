"""Every route in one table: path, method, handler, and the models the OpenAPI document is built from."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from pydantic import BaseModel

from vfed.common.api import resources as res
from vfed.server import schemas as sc
from vfed.server.api import (
    audit,
    blobs,
    certificates,
    collaborations,
    key_records,
    ledger,
    meta,
    nodes,
    organizations,
    runs,
    task_create,
    task_wait,
    tasks,
    tokens,
    uploads,
    users,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
API = "/api/v1"


@dataclass(frozen=True)
class Op:
    """One operation; `path` uses {id} (integer), {blob_id} and {upload_id} (hex string) placeholders."""

    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    body: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    status: int = 200
    auth: bool = True
    binary_in: bool = False
    binary_out: bool = False
    multipart_in: bool = False  # also takes the `body` model as a `task` part plus an octet-stream `input`


OPS: list[Op] = [
    Op(
        "POST",
        "/token/user",
        tokens.token_user,
        "Log in with username and password",
        "tokens",
        sc.TokenUserIn,
        sc.TokenUserOut,
        auth=False,
    ),
    Op(
        "POST",
        "/token/node",
        tokens.token_node,
        "Log in with a node API key",
        "tokens",
        sc.TokenNodeIn,
        sc.TokenNodeOut,
        auth=False,
    ),
    Op(
        "POST",
        "/token/refresh",
        tokens.token_refresh,
        "Exchange a refresh token",
        "tokens",
        sc.TokenRefreshIn,
        sc.TokenRefreshOut,
        auth=False,
    ),
    Op(
        "POST",
        "/token/revoke",
        tokens.token_revoke,
        "Log out: revoke a refresh token and every token refreshed from the same login",
        "tokens",
        sc.TokenRefreshIn,
        status=204,
        auth=False,
    ),
    Op(
        "GET",
        "/organizations",
        organizations.list_organizations,
        "List organizations",
        "organizations",
        response=res.OrganizationPage,
        query=sc.OrganizationQuery,
    ),
    Op(
        "POST",
        "/organizations",
        organizations.create_organization,
        "Create an organization (root)",
        "organizations",
        sc.OrganizationIn,
        res.Organization,
        status=201,
    ),
    Op(
        "GET",
        "/organizations/{id}",
        organizations.get_organization,
        "Get an organization",
        "organizations",
        response=res.Organization,
    ),
    Op(
        "PUT",
        "/organizations/{id}/public_key",
        organizations.put_public_key,
        "Replace the public key",
        "organizations",
        sc.PublicKeyIn,
        res.Organization,
    ),
    Op(
        "GET",
        "/organizations/{id}/keys",
        organizations.list_keys,
        "Previous public keys, newest first",
        "organizations",
        response=sc.OrganizationKeysOut,
    ),
    Op(
        "GET",
        "/organizations/{id}/key-records",
        key_records.list_key_records,
        "The organization's signed key records, in append order",
        "organizations",
        response=sc.KeyRecordsOut,
    ),
    Op(
        "POST",
        "/organizations/{id}/key-records",
        key_records.append_key_records,
        "Append signed key records (root, its admin or its node; 200 when all were stored already)",
        "organizations",
        sc.KeyRecordsIn,
        sc.KeyRecordsOut,
        status=201,
    ),
    Op(
        "GET",
        "/organizations/{id}/certificates",
        certificates.list_certificates,
        "Researcher certificates of the organization",
        "organizations",
        response=sc.CertificatesOut,
        query=sc.CertificateQuery,
    ),
    Op(
        "POST",
        "/organizations/{id}/certificates",
        certificates.post_certificate,
        "Store a researcher certificate (root, its admin or its node)",
        "organizations",
        sc.CertificateIn,
        sc.CertificateOut,
        status=201,
    ),
    Op(
        "GET",
        "/organizations/{id}/revocations",
        certificates.list_revocations,
        "The organization's certificate revocations",
        "organizations",
        response=sc.RevocationsOut,
    ),
    Op(
        "POST",
        "/organizations/{id}/revocations",
        certificates.post_revocation,
        "Revoke a stored certificate (root, its admin or its node)",
        "organizations",
        sc.RevocationIn,
        sc.CertificateOut,
        status=201,
    ),
    Op(
        "GET",
        "/collaborations",
        collaborations.list_collaborations,
        "List collaborations",
        "collaborations",
        response=res.CollaborationPage,
        query=sc.CollaborationQuery,
    ),
    Op(
        "POST",
        "/collaborations",
        collaborations.create_collaboration,
        "Create a collaboration (root)",
        "collaborations",
        sc.CollaborationIn,
        res.Collaboration,
        status=201,
    ),
    Op(
        "GET",
        "/collaborations/{id}",
        collaborations.get_collaboration,
        "Get a collaboration",
        "collaborations",
        response=res.Collaboration,
    ),
    Op(
        "PATCH",
        "/collaborations/{id}",
        collaborations.patch_collaboration,
        "Change a collaboration (root)",
        "collaborations",
        sc.CollaborationPatch,
        res.Collaboration,
    ),
    Op(
        "GET",
        "/collaborations/{id}/ledger",
        ledger.read_ledger,
        "The collaboration's ledger from a position: signed entries with their places and chain hashes "
        "(members only; verify them, the server is not trusted)",
        "ledger",
        response=sc.LedgerPageOut,
        query=sc.LedgerQuery,
    ),
    Op(
        "POST",
        "/collaborations/{id}/ledger",
        ledger.append_entry,
        "Append a signed dataset, lease, receipt or checkpoint entry (verified first; key records, "
        "certificates and revocations come through the organization's endpoints)",
        "ledger",
        sc.LedgerAppendIn,
        sc.LedgerAppendOut,
        status=201,
    ),
    Op("GET", "/nodes", nodes.list_nodes, "List nodes", "nodes", response=res.NodePage, query=sc.NodeQuery),
    Op(
        "POST",
        "/nodes",
        nodes.create_node,
        "Register a node; its API key is answered once",
        "nodes",
        sc.NodeIn,
        sc.NodeCreatedOut,
        status=201,
    ),
    Op("GET", "/nodes/self", nodes.node_self, "The calling node", "nodes", response=res.Node),
    Op(
        "POST",
        "/nodes/heartbeat",
        nodes.heartbeat,
        "Mark the calling node online",
        "nodes",
        response=res.Node,
    ),
    Op("GET", "/nodes/{id}", nodes.get_node, "Get a node", "nodes", response=res.Node),
    Op(
        "DELETE",
        "/nodes/{id}",
        nodes.delete_node,
        "Delete a node; its API key and tokens stop working (root, its org-admin)",
        "nodes",
        status=204,
    ),
    Op(
        "POST",
        "/nodes/{id}/api-key",
        nodes.rotate_api_key,
        "Replace a node's API key, answered once; the old key and the node's tokens stop working",
        "nodes",
        response=sc.NodeCreatedOut,
    ),
    Op("GET", "/users", users.list_users, "List users", "users", response=sc.UserPage, query=sc.UserQuery),
    Op("POST", "/users", users.create_user, "Create a user", "users", sc.UserIn, sc.UserOut, status=201),
    Op("GET", "/users/{id}", users.get_user, "Get a user", "users", response=sc.UserOut),
    Op(
        "DELETE",
        "/users/{id}",
        users.delete_user,
        "Delete a user (root, or its org-admin when it could grant all the user's roles)",
        "users",
        status=204,
    ),
    Op(
        "PATCH",
        "/users/{id}",
        users.patch_user,
        "Change a user's password or roles",
        "users",
        sc.UserPatch,
        sc.UserOut,
    ),
    Op(
        "GET",
        "/roles",
        users.list_roles,
        "List roles and their rules",
        "users",
        response=sc.RolePage,
        query=sc.PageQuery,
    ),
    Op(
        "POST",
        "/blobs",
        blobs.upload_blob,
        "Upload a blob (streamed octet-stream)",
        "blobs",
        response=res.Blob,
        status=201,
        binary_in=True,
    ),
    Op(
        "POST",
        "/uploads",
        uploads.create_upload,
        "Start a resumable upload (size and SHA-256 now or at completion); appends go to its id",
        "blobs",
        sc.UploadIn,
        sc.UploadOut,
        status=201,
    ),
    Op(
        "GET",
        "/uploads/{upload_id}",
        uploads.get_upload,
        "A resumable upload's committed offset (where a broken append goes on from)",
        "blobs",
        response=sc.UploadOut,
    ),
    Op(
        "PATCH",
        "/uploads/{upload_id}",
        uploads.append_upload,
        "Append bytes at the committed offset (409 with the right `offset` otherwise)",
        "blobs",
        response=sc.UploadOut,
        query=sc.UploadAppendQuery,
        binary_in=True,
    ),
    Op(
        "POST",
        "/uploads/{upload_id}/complete",
        uploads.complete_upload,
        "Finish a resumable upload: size and SHA-256 are checked, then the blob exists",
        "blobs",
        sc.UploadCompleteIn,
        res.Blob,
        status=201,
    ),
    Op(
        "DELETE",
        "/uploads/{upload_id}",
        uploads.delete_upload,
        "Drop a resumable upload and its bytes",
        "blobs",
        status=204,
    ),
    Op(
        "GET",
        "/blobs/{blob_id}",
        blobs.download_blob,
        "Download a blob; Range resumes",
        "blobs",
        binary_out=True,
    ),
    Op("GET", "/tasks", tasks.list_tasks, "List tasks", "tasks", response=res.TaskPage, query=sc.TaskQuery),
    Op(
        "POST",
        "/tasks",
        task_create.create_task,
        "Create a task with one run per organization (JSON, or multipart with the input envelope)",
        "tasks",
        sc.TaskIn,
        res.Task,
        status=201,
        multipart_in=True,
    ),
    Op("GET", "/tasks/{id}", tasks.get_task, "Get a task", "tasks", response=res.Task),
    Op(
        "GET",
        "/tasks/{id}/wait",
        task_wait.wait_task,
        "Wait until every run finished (or, with `since`, any changed); answers at the timeout regardless",
        "tasks",
        response=res.TaskWait,
        query=sc.TaskWaitQuery,
    ),
    Op(
        "POST",
        "/tasks/{id}/kill",
        tasks.kill_task,
        "Kill a task's unfinished runs",
        "tasks",
        response=res.Task,
    ),
    Op("GET", "/runs", runs.list_runs, "List runs", "runs", response=res.RunPage, query=sc.RunQuery),
    Op("GET", "/runs/{id}", runs.get_run, "Get a run", "runs", response=res.Run),
    Op(
        "PATCH",
        "/runs/{id}",
        runs.patch_run,
        "Report a run's progress (claiming node)",
        "runs",
        sc.RunPatch,
        res.Run,
    ),
    Op("POST", "/runs/{id}/claim", runs.claim_run, "Claim a pending run (node)", "runs", response=res.Claim),
    Op(
        "POST",
        "/runs/{id}/token",
        runs.run_token,
        "A token for the run's proxy (claiming node)",
        "runs",
        response=res.RunToken,
    ),
    Op(
        "GET",
        "/audit",
        audit.list_audit,
        "Administrative actions, newest first (root: all; org-admin: its organization's)",
        "audit",
        response=sc.AuditPage,
        query=sc.AuditQuery,
    ),
    Op("GET", "/health", meta.health, "Liveness", "meta", response=sc.HealthOut, auth=False),
    Op(
        "GET",
        "/doorbell",
        meta.doorbell_info,
        "Where the MQTT doorbell rings",
        "meta",
        response=sc.DoorbellOut,
        auth=False,
    ),
]


def _aiohttp_path(path: str) -> str:
    hexes = {name: f"{{{name}:[0-9a-f]{{32}}}}" for name in ("blob_id", "upload_id")}
    path = path.replace("{id}", r"{id:\d{1,12}}")
    for name, pattern in hexes.items():
        path = path.replace(f"{{{name}}}", pattern)
    return API + path


def add_routes(app: web.Application) -> None:
    """Register every operation, plus the non-API routes (docs, openapi, metrics)."""
    for op in OPS:
        app.router.add_route(op.method, _aiohttp_path(op.path), op.handler)
    app.router.add_get(API + "/openapi.json", meta.openapi)
    app.router.add_get(API + "/docs", meta.docs)
    app.router.add_get("/metrics", meta.metrics)
