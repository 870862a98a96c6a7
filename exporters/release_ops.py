"""Release changes on a running stack: ``recstack release validate/promote/rollback/ab``.

Every change follows one order, so that a crash at any point leaves either the old
release serving or the new one fully (never a mix), and the next command or restart
completes it:

1. take the state lock (``flock``: released by the kernel if this process dies);
2. validate the release(s) (exporters/release_validate.py) — a refusal changes nothing;
3. estimate memory, and refuse a change that would not fit beside the served releases;
4. load the new release's models into Triton next to the served ones (if Triton runs);
5. write the new state atomically — the commit point;
6. ask the orchestrator — every replica, with ``orchestrator_replicas`` > 1 — to apply it
   now (``POST /admin/reload``; each also watches the file) and wait for the answers:
   done, or refused by one (then the state is put back, as a new revision);
7. the orchestrator closes the old release once no request uses it and unloads from
   Triton what no served release needs (without an orchestrator, this command does; with
   replicas, which do not prune, this command does once all of them serve the new state).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import secrets
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from exporters.release import load_manifest, release_ids
from exporters.release_state import (
    Arm,
    ReleaseState,
    ensure_state,
    load_state,
    locked_state,
    parse_split,
    save_state,
)
from exporters.release_validate import check_fits, format_report, validate
from recstack.errors import UserError
from recstack.settings import Settings, get_settings

log = logging.getLogger(__name__)

RELOAD_TIMEOUT_S = 600.0  # a 1M-item release loads and warms in ~1-2 min


def _admin(
    settings: Settings, method: str, path: str, timeout: float, port: int | None = None
) -> dict[str, Any] | None:
    """An orchestrator's admin API (``port``, default the one orchestrator's); None when
    no orchestrator listens."""
    port = settings.orchestrator_admin_port if port is None else port
    url = f"http://{settings.orchestrator_admin_host}:{port}{path}"
    request = urllib.request.Request(url, data=b"" if method == "POST" else None, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # loopback
            doc: dict[str, Any] = json.loads(response.read())
            return doc
    except urllib.error.HTTPError as e:
        raise UserError(f"orchestrator admin API {path}: HTTP {e.code} {e.read()[:200]!r}") from e
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None


def _admin_all(
    settings: Settings, method: str, path: str, timeout: float
) -> dict[str, dict[str, Any] | None]:
    """The same call on every orchestrator (the replicas of ``orchestrator_replicas``, or
    the one), at once: each replica swaps on its own; by name, None where none answered."""
    from orchestrator.replicas import admin_ports

    ports = admin_ports(settings)
    with ThreadPoolExecutor(max_workers=len(ports)) as pool:
        futures = {
            n: pool.submit(_admin, settings, method, path, timeout, p) for n, p in ports.items()
        }
        return {n: f.result() for n, f in futures.items()}


def _running(settings: Settings) -> dict[str, Any] | None:
    """What the orchestrators load (``loaded``: the union over replicas; ``answering``:
    how many answered), or None when none answers."""
    docs = [d for d in _admin_all(settings, "GET", "/admin/releases", 5.0).values() if d]
    if not docs:
        return None
    loaded = sorted({r for d in docs for r in d.get("loaded") or []})
    return {"loaded": loaded, "answering": len(docs)}


def _triton_up(settings: Settings) -> bool:
    from orchestrator.triton_server import server_ready

    return server_ready(settings)


def _memory_check(settings: Settings, new: list[int], running: dict[str, Any] | None) -> None:
    """Refuse a change whose new releases would not fit beside the loaded ones (checked
    here when the orchestrator runs on this machine; it checks again itself)."""
    if running is None:
        return
    loaded = set(running.get("loaded") or [])
    fresh = [r for r in new if r not in loaded]
    if not fresh:
        return
    # Replicas on this machine each load the release: the need is per replica.
    copies = int(running.get("answering") or 1)
    need, free = check_fits(settings, fresh, copies=copies)
    per = f" ({copies} replicas)" if copies > 1 else ""
    print(f"memory: ~{need:.0f} MB for {fresh}{per} during the transition; {free:.0f} MB available")


def _apply(
    settings: Settings,
    state: ReleaseState,
    before: ReleaseState,
    new: list[int],
    running: dict[str, Any] | None,
) -> ReleaseState:
    """Steps 4-7 for an already validated ``state`` (the lock is held by the caller)."""
    if _triton_up(settings):
        from orchestrator.triton_server import load_releases

        try:
            load_releases(settings, sorted({*before.serving, *state.serving}), keep=True)
        except Exception as e:
            raise UserError(f"Triton could not load the release: {e}. Nothing changed.") from e
    _carry_items(settings, before, state)
    save_state(settings, state)  # the commit point
    print(f"state revision {state.revision}: {describe_routing(state)}")
    if running is None:
        print("no orchestrator answers on the admin port: it serves this state when it starts")
        if _triton_up(settings):
            from orchestrator.triton_server import prune_releases

            prune_releases(settings, state.serving)
        return state
    docs = _admin_all(settings, "POST", "/admin/reload", RELOAD_TIMEOUT_S)
    refusals = []
    for name, doc in docs.items():
        last = (doc or {}).get("last_change") or {}
        if doc is None:
            print(f"{name} stopped answering; it applies the state when it is back")
        elif doc.get("revision") == state.revision:
            print(f"{name} serves revision {state.revision} ({last.get('seconds')} s)")
        elif last.get("revision") == state.revision and last.get("status") in (
            "refused",
            "failed",
        ):
            refusals.append(f"{name} {last['status']} the change: {last.get('detail')}")
    if refusals:
        # Keep the state true to what serves: put the previous routing back, as a new
        # revision, so that replicas that did swap swap back.
        reverted = ReleaseState.from_json(before.to_json())
        reverted.history = state.history
        reverted.revision = state.revision
        reverted.record("revert", reason="; ".join(refusals))
        save_state(settings, reverted)
        _admin_all(settings, "POST", "/admin/reload", RELOAD_TIMEOUT_S)
        raise UserError(
            f"{'; '.join(refusals)}. The state is back to {describe_routing(reverted)}."
        )
    if settings.orchestrator_replicas > 1 or not settings.orchestrator_prunes_triton:
        # The orchestrators do not prune (one would unload what another still serves): once
        # every one of them serves the new state (each retired the old releases first),
        # nothing needs what the state no longer serves.
        if all(d is not None and d.get("revision") == state.revision for d in docs.values()):
            if _triton_up(settings):
                from orchestrator.triton_server import prune_releases

                dropped = prune_releases(settings, state.serving)
                print(f"Triton: unloaded {len(dropped)} model(s) no served release needs")
        else:
            print("not every orchestrator serves the new state: Triton is not pruned")
    return state


def _carry_items(settings: Settings, before: ReleaseState, state: ReleaseState) -> None:
    """Before the commit point: releases that start serving get the items added to the
    ones that served until now (exporters/item_delta.py ``carry``), so a promotion, a
    rollback or an A/B arm never drops an item the catalog had."""
    from exporters.item_delta import carry_all

    fresh = [r for r in state.serving if r not in before.serving]
    if not fresh or not before.serving:
        return
    try:
        lines = carry_all(settings, before.serving, fresh)
    except UserError:
        raise
    except Exception as e:
        raise UserError(
            f"the items added to releases {before.serving} could not be carried into "
            f"{fresh}: {e}. Nothing changed."
        ) from e
    for line in lines:
        print(line)


@contextlib.contextmanager
def _change(settings: Settings) -> Iterator[tuple[ReleaseState, ReleaseState]]:
    """The state under its lock, and a copy of it as it was (to compare and revert to)."""
    ensure_state(settings)
    with locked_state(settings) as state:
        yield state, ReleaseState.from_json(state.to_json())


def describe_routing(state: ReleaseState) -> str:
    if state.arms:
        arms = " / ".join(f"release {a.release} {a.share:.0%}" for a in state.arms)
        return f"A/B {arms} (live {state.live})"
    return f"live release {state.live}"


def promote(
    settings: Settings, release_id: int, reason: str | None, force_reason: str | None = None
) -> ReleaseState:
    """Make ``release_id`` the live release (ends any A/B test)."""
    with _change(settings) as (state, before):
        if state.live == release_id and not state.arms:
            print(f"release {release_id} is already live")
            return state
        report = validate(
            settings,
            release_id,
            live=state.live,
            force_reason=force_reason,
        )
        print(format_report(report))
        running = _running(settings)
        _memory_check(settings, [release_id], running)
        if state.live is not None and state.live != release_id:
            state.previous.append(state.live)
        old = state.live
        state.live = release_id
        state.arms = []
        state.record(
            "promote",
            reason,
            release=release_id,
            previous=old,
            **({"forced": force_reason} if report.get("forced") else {}),
        )
        return _apply(settings, state, before, [release_id], running)


def rollback(settings: Settings, reason: str | None) -> ReleaseState:
    """Serve the previous live release again (ends any A/B test)."""
    with _change(settings) as (state, before):
        if not state.previous:
            raise UserError("nothing to roll back to: no earlier live release in the history")
        target = state.previous[-1]
        report = validate(
            settings,
            target,
            compare_live=False,  # it was live before: only its artifacts are re-checked
        )
        print(format_report(report))
        running = _running(settings)
        _memory_check(settings, [target], running)
        state.previous.pop()
        old = state.live
        state.live = target
        state.arms = []
        state.record("rollback", reason, release=target, previous=old)
        return _apply(settings, state, before, [target], running)


def ab_start(
    settings: Settings,
    releases: list[int],
    split: str,
    reason: str | None,
    force_reason: str | None = None,
    salt: str | None = None,
) -> ReleaseState:
    """Split users over ``releases`` by a stable hash of their id (``--split 90/10``)."""
    if len(set(releases)) != len(releases) or len(releases) < 2:
        raise UserError("an A/B test needs two or more different releases")
    shares = parse_split(split, len(releases))
    with _change(settings) as (state, before):
        for rid in releases:
            report = validate(
                settings,
                rid,
                live=state.live,
                force_reason=force_reason,
                compare_live=rid != state.live,
            )
            print(format_report(report))
        running = _running(settings)
        _memory_check(settings, releases, running)
        state.arms = [Arm(r, s) for r, s in zip(releases, shares, strict=True)]
        state.salt = salt or secrets.token_hex(4)
        state.record("ab_start", reason, arms=[[a.release, a.share] for a in state.arms])
        return _apply(settings, state, before, releases, running)


def ab_stop(settings: Settings, reason: str | None) -> ReleaseState:
    """End the A/B test: the live release serves everyone again."""
    with _change(settings) as (state, before):
        if not state.arms:
            raise UserError("no A/B test is running")
        state.arms = []
        state.record("ab_stop", reason, release=state.live)
        running = _running(settings)
        return _apply(settings, state, before, [], running)


# ------------------------------------------------------------------------- CLI
def cli_list(args: argparse.Namespace) -> int:
    """``recstack release list``: status, key metrics and validation of every release."""
    settings = get_settings()
    ids = release_ids(settings)
    if not ids:
        print(f"no releases in {settings.releases_dir}")
        return 0
    state = load_state(settings)
    print(f"{'id':>4}  {'status':18s} {'created':25s} {'ndcg@10':>8s} {'vs best':>8s}  validated")
    for rid in ids:
        m = load_manifest(settings, rid)
        gate = m.get("quality_gate") or {}
        ndcg = m.get("metrics", {}).get("pipeline", {}).get("ndcg@10")
        best = gate.get("best_baseline_ndcg@10")
        ratio = f"{ndcg / best:.2f}x" if ndcg and best else "-"
        vfile = settings.releases_dir / str(rid) / "validation.json"
        validated = "-"
        if vfile.exists():
            v = json.loads(vfile.read_text())
            validated = ("passed" if v["passed"] else "FAILED") + f" {v['at']}"
        ndcg_text = f"{ndcg:.4f}" if ndcg is not None else "-"
        print(
            f"{rid:4d}  {state.status(rid):18s} {m['created_at']:25s} {ndcg_text:>8s} "
            f"{ratio:>8s}  {validated}"
        )
    print(f"serving: {describe_routing(state)} (revision {state.revision})")
    return 0


def cli_validate(args: argparse.Namespace) -> int:
    settings = get_settings()
    state = load_state(settings)
    report = validate(
        settings,
        int(args.release_id),
        live=state.live,
        force_reason=_force(args),
        triton=not args.no_triton,
    )
    print(format_report(report))
    return 0


def _force(args: argparse.Namespace) -> str | None:
    if getattr(args, "force", False):
        if not args.reason:
            raise UserError("--force needs --reason: it is recorded in the release history")
        return str(args.reason)
    return None


def cli_promote(args: argparse.Namespace) -> int:
    promote(get_settings(), int(args.release_id), args.reason, _force(args))
    return 0


def cli_rollback(args: argparse.Namespace) -> int:
    rollback(get_settings(), args.reason)
    return 0


def cli_ab(args: argparse.Namespace) -> int:
    """``recstack release ab R1 R2 --split 90/10 | ab stop | ab report``."""
    settings = get_settings()
    if args.args == ["stop"]:
        ab_stop(settings, args.reason)
    elif args.args == ["report"]:
        from exporters import ab_report

        if not args.arms:  # the running (or last) A/B test's arms, from the state
            state = load_state(settings)
            arms = [a.release for a in state.arms] or _last_ab_arms(state)
            args.arms = [str(a) for a in arms[:2]] if len(arms) >= 2 else None
        return ab_report.cli(args)
    else:
        if not all(a.isdigit() for a in args.args):
            raise UserError(
                f"release ab: expected release ids, `stop` or `report`, got {args.args}"
            )
        ab_start(settings, [int(r) for r in args.args], args.split, args.reason, _force(args))
    return 0


def _last_ab_arms(state: ReleaseState) -> list[int]:
    for h in reversed(state.history):
        if h.get("action") == "ab_start":
            return [int(a[0]) for a in h.get("arms", [])]
    return []


def cli_history(args: argparse.Namespace) -> int:
    """``recstack release history``: every change with who, when and why."""
    state = load_state(get_settings())
    for h in state.history[-args.last :]:
        print(json.dumps(h))
    print(f"serving: {describe_routing(state)} (revision {state.revision})")
    return 0
