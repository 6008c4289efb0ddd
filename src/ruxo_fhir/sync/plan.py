"""Dry-run planning and server checks: learn what a push would do, writing nothing."""
from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from ruxo_fhir.errors import RuxoError, ServerError
from ruxo_fhir.fhir_version import FhirVersion
from ruxo_fhir.mapping.spec import MappingSpec
from ruxo_fhir.resource import Resource
from ruxo_fhir.sync.capabilities import (
    WRITTEN_TYPES,
    Capabilities,
    check_version,
    server_interactions,
)
from ruxo_fhir.sync.client import Client as Client  # the one client seam (was defined here)
from ruxo_fhir.sync.ledger import Ledger
from ruxo_fhir.sync.push import Pusher, PushOptions, case_of, shared_systems_warning


@dataclass
class PushPlan:
    by_type: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    problems: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    retractable: list[str] = field(default_factory=list)
    prune_refused: str | None = None
    notices: list[str] = field(default_factory=list)
    validated_with: str = "none"

    @property
    def totals(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for c in self.by_type.values():
            total.update(c)
        return total


def _server_ops(caps: dict[str, Any]) -> set[str]:
    return set(Capabilities.read(caps).operations)


def plan_push(client: Client, resources: Iterable[Resource], mapping: MappingSpec, version: FhirVersion,
              case_rows: dict[str, int] | None = None, chunk: int = 100, *,
              options: PushOptions | None = None, ledger: Ledger | None = None) -> PushPlan:
    """Per type: how many would be created, updated, stay unchanged or be conflicts -- the
    push's own decisions, reading the server as push does; server-side validation problems via
    `$validate` where offered. Only GETs and `$validate` POSTs are sent."""
    plan = PushPlan()
    caps = client.capabilities()
    interactions = server_interactions(caps)
    if interactions and "transaction" not in interactions:
        plan.notices.append("server declares no transaction interaction: push would switch to batch mode")
    can_validate = "validate" in _server_ops(caps)
    plan.validated_with = "$validate" if can_validate else "local models only (server offers no $validate)"
    rows = case_rows or {}
    opts = replace(options or PushOptions(version=version), dry_run=True, version=version)

    def decided(res: Resource, action: str) -> None:
        if can_validate and action in ("create", "update"):
            _validate_remote(client, res, mapping, rows, plan)

    pusher = Pusher(client, mapping, opts, ledger, case_rows=rows, on_decided=decided)
    result = pusher.run(resources)
    names = {"created": "create", "updated": "update", "unchanged": "unchanged", "conflict": "conflict",
             "rejected": "rejected"}
    for kind, counts in result.by_type.items():
        for outcome, n in counts.items():
            plan.by_type[kind][names.get(outcome, outcome)] += n
    plan.notices.extend(result.notices)
    plan.conflicts.extend(result.conflicts)
    plan.retractable.extend(result.retractable)
    plan.prune_refused = result.prune_refused
    plan.problems.extend(result.errors)
    return plan


def _validate_remote(client: Client, res: Resource, mapping: MappingSpec, rows: dict[str, int],
                     plan: PushPlan) -> None:
    from ruxo_fhir.transport.outcome import summarize_outcome

    answer = client.request("POST", f"{res['resourceType']}/$validate", json=res, idempotent=True, check=False)
    try:
        body = answer.json()
    except ValueError:
        body = {}
    lines = [ln for ln in summarize_outcome(body) if not ln.startswith(("information", "warning"))] \
        if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome" else []
    if not lines and answer.status >= 400:
        lines = [f"HTTP {answer.status}"]
    case = case_of(res, mapping)
    where = f" (case {case}" + (f", row {rows[case]}" if case in rows else "") + ")" if case else ""
    for line in lines:
        plan.problems.append(f"{res['resourceType']}/{res['id']}{where}: {line}")


# --- check ------------------------------------------------------------------------------

NEEDED_TYPES = WRITTEN_TYPES  # every type push writes, AdverseEvent included


@dataclass
class CheckLine:
    item: str
    ok: bool
    detail: str
    needed: bool = True


def check_server(client: Client, version: FhirVersion, token_info: str | None = None,
                 mapping: MappingSpec | None = None) -> list[CheckLine]:
    """One line per thing push/pull need; `ok=False and needed` means it will not work."""
    out: list[CheckLine] = []
    shared = shared_systems_warning(mapping, client.base_url) if mapping is not None else None
    if shared:
        out.append(CheckLine("identifier systems", False, shared, needed=False))
    try:
        caps = client.capabilities()
    except ServerError as exc:
        out.append(CheckLine("reachable", False, str(exc)))
        return out
    except RuxoError as exc:
        out.append(CheckLine("reachable", False, str(exc)))
        return out
    scheme = client.base_url.split(":", 1)[0]
    out.append(CheckLine("reachable", True, f"{client.base_url} answered /metadata"))
    verify = getattr(client, "verify", True)
    if scheme != "https":
        out.append(CheckLine("TLS", False, "plain http (no TLS)", needed=False))
    elif verify is False:
        out.append(CheckLine("TLS", False, "certificate verification OFF (--insecure): anyone on the path can "
                                           "read and change the traffic", needed=False))
    else:
        how = f"verified against the CA bundle {verify}" if isinstance(verify, str) else "verified"
        out.append(CheckLine("TLS", True, how, needed=False))
    server_version = str(caps.get("fhirVersion", "?"))
    try:
        warning = check_version(caps, version)
        out.append(CheckLine("FHIR version", True, f"{server_version}" + (f" ({warning})" if warning else "")))
    except RuxoError as exc:
        out.append(CheckLine("FHIR version", False, str(exc)))
    if token_info is not None:
        out.append(CheckLine("auth", True, token_info))
    try:
        # one page only: a server whose `next` links never end must not keep `check` busy
        next(iter(client.search_bundles("Patient", {"_count": "1", "_elements": "id"})), None)
        out.append(CheckLine("auth", True, "authorised search (Patient?_count=1)"))
    except ServerError as exc:
        out.append(CheckLine("auth", False, str(exc)))
    interactions = server_interactions(caps)
    out.append(CheckLine("transaction", "transaction" in interactions,
                         "declared" if "transaction" in interactions else "missing (push falls back to batch)",
                         needed="batch" not in interactions))
    # batch is push's fallback for servers that refuse transactions: with transaction declared its
    # absence costs nothing (HAPI JPA serves batch but its CapabilityStatement lists only transaction).
    out.append(CheckLine("batch", "batch" in interactions or "transaction" in interactions,
                         "declared" if "batch" in interactions else
                         "not declared (push uses transactions; batch is only its fallback)" if
                         "transaction" in interactions else "missing",
                         needed="transaction" not in interactions))
    resources = {r.get("type"): r for rest in caps.get("rest", []) for r in rest.get("resource", [])}
    declared = Capabilities.read(caps)
    for kind in NEEDED_TYPES:
        res = resources.get(kind)
        missing = declared.missing_interactions(kind, ("update", "read", "search-type"))
        if res is None or missing is None:
            out.append(CheckLine(kind, False, "resource type not declared (push writes it)"))
            continue
        params = {p.get("name") for p in res.get("searchParam", [])}
        out.append(CheckLine(kind, not missing, "update, read, search" if not missing
                             else f"missing interaction(s): {', '.join(missing)}"))
        if "_lastUpdated" not in params:
            out.append(CheckLine(f"{kind} _lastUpdated", False, "search parameter not declared "
                                 "(incremental pull may not work)", needed=False))
        cond = [name for name, flag in (("conditional create", res.get("conditionalCreate")),
                                        ("conditional update", res.get("conditionalUpdate"))) if not flag]
        if cond:
            out.append(CheckLine(f"{kind} conditional", False, f"not declared: {', '.join(cond)} "
                                 "(needed by push --ids server only; client ids use PUT at stable ids)", needed=False))
    ops = _server_ops(caps)
    out.append(CheckLine("$export", "export" in ops, "declared (pull --bulk works)" if "export" in ops
                         else "not declared (pull --bulk will not work; paged pull does)", needed=False))
    return out
