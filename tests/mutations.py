"""Known mutations of the rules, each of which a fast unit test must catch.

usage: python3 tests/mutations.py [--list] [NAME...]

Each mutation is one exact text replacement in one product file (the original text must
occur exactly once, or the script stops: the code moved and the mutation must be updated).
For each, the repository's code and tests are copied into a temporary directory, the
mutation is applied there, and the named tests run against the copy; at least one must fail.
First the same tests run once on an unmutated copy and must all pass, so a failure is the
mutation's doing. Prints `MUTATION name: CAUGHT by ...` or `MUTATION name: SURVIVED` per
mutation and exits non-zero if any survived (2 if the setup itself failed). The working tree
is never modified.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPY = ("meshd", "sdk", "cli", "sim", "tests", "pyproject.toml")
RENAMED = {"meshd_sdk": "sdk", "meshd_cli": "cli", "meshd_sim": "sim"}  # as setup.py maps them
TIMEOUT = 300  # seconds per test run; a mutant that hangs its tests counts as caught


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    original: str
    mutant: str
    tests: tuple[str, ...]
    what: str


MUTATIONS = [
    # -- the ten rules (eleven mutations) whose mutants survived the review of issue 12 -----
    Mutation("membership-s1-same-incarnation", "meshd/membership/core.py",
             "        elif (msg.incarnation <= m.incarnation\n",
             "        elif (msg.incarnation < m.incarnation\n",
             ("tests/unit/membership/test_incarnations.py",),
             "an Alive at the same incarnation clears a suspicion"),
    # -- issue 22: the member table and digest push-pull ----------------------------------
    Mutation("table-digest-ignores-state", "meshd/membership/table.py",
             'f"{rec.node}\\x00{rec.incarnation}\\x00{rec.state}\\x00{rec.addr}"',
             'f"{rec.node}\\x00{rec.incarnation}\\x00{rec.addr}"',
             ("tests/unit/membership/test_table.py",),
             "a member dead here and alive there hashes the same: anti-entropy misses it"),
    Mutation("digest-reply-sends-the-whole-table", "meshd/membership/core.py",
             "        states = self._t.bucket_records(differ) if differ else []\n",
             "        states = self._t.records() if differ else []\n",
             ("tests/unit/membership/test_digest_push_pull.py",),
             "a digest that differs in one bucket is answered with the full table"),
    Mutation("digest-back-sends-what-the-peer-showed", "meshd/membership/core.py",
             "                if theirs.get(st.node) != record_hash(st)]\n",
             "                if True]\n",
             ("tests/unit/membership/test_digest_push_pull.py",),
             "the asker sends back records the peer just showed it holds"),
    Mutation("digest-sent-to-old-members", "meshd/membership/core.py",
             "        if self.takes_digests is not None and not self.takes_digests(peer):\n",
             "        if False:\n",
             ("tests/unit/membership/test_digest_push_pull.py",),
             "a member of a release without digests is sent one (it cannot decode it)"),
    Mutation("push-pull-cap-not-enforced", "meshd/membership/service.py",
             'if request and self.stats["push_pulls_serving"] >= MAX_PUSH_PULLS:',
             'if False:',
             ("tests/unit/membership/test_service_push_pull.py",),
             "push-pull requests past memberlist's cap are served anyway"),
    Mutation("table-restore-shares-no-records", "meshd/membership/table.py",
             "            recs[lo:hi] = plan.recs\n",
             "            recs[lo:hi] = [MemberState(r.node, r.addr, r.incarnation, r.state,"
             " r.tags)\n                           for r in plan.recs]\n",
             ("tests/unit/membership/test_table.py",),
             "every simulated core holds its own copy of every record"),
    Mutation("restore-run-drops-a-live-member", "meshd/membership/core.py",
             "            self._live = plan.live[:k] + plan.live[k + 1:]\n",
             "            self._live = plan.live[:k] + plan.live[k + 2:]\n",
             ("tests/unit/membership/test_table.py",),
             "a restore in array copies loses the live member after the restoring node"),
    Mutation("shuffle-not-random-shuffle", "meshd/membership/core.py",
             "        while j >= n:\n            j = getrandbits(k)\n",
             "        if j >= n:\n            j = n - 1\n",
             ("tests/unit/membership/test_table.py",),
             "the inlined shuffle draws another permutation than random.shuffle"),
    Mutation("decoded-tags-not-interned", "meshd/membership/messages.py",
             "    return {intern(key): intern(value) for key, value in v.items()}\n",
             "    return v\n",
             ("tests/unit/membership/test_table.py",),
             "every decoded member holds its own copy of tag strings every member shares"),
    Mutation("wire-size-off-at-24", "meshd/membership/messages.py",
             "    return (1 if n < 24 else _head_size(n)) + n\n",
             "    return (1 if n <= 24 else _head_size(n)) + n\n",
             ("tests/unit/membership/test_messages.py",),
             "a 24-byte name is counted one byte short of its encoding"),
    Mutation("routing-hop-cost-ignored", "meshd/routing/table.py",
             "weight=(rtt + back) / 2 + self.hop_cost)",
             "weight=(rtt + back) / 2)",
             ("tests/unit/routing/test_table_rules.py",),
             "members that answer directly are routed through relays for RTT noise"),
    Mutation("routing-down-hop-avoided-for-good", "meshd/routing/monitor.py",
             "        watched = (hops | self.down) - self.core.unreached\n",
             "        watched = hops | self.down\n",
             ("tests/unit/routing/test_monitor.py",),
             "a down hop stays avoided as a relay after membership found it unreachable"),
    Mutation("resp-no-deadline-watch", "meshd/store/engines/inflight.py",
             "                    nursery.start_soon(self._deadlines)\n",
             "",
             ("tests/unit/store/test_resp.py",),
             "a stalled Redis connection stays open while nobody waits on it"),
    Mutation("resp-connect-failure-not-shared", "meshd/store/engines/inflight.py",
             "                raise ConnectionError(self._failure)",
             "                pass",
             ("tests/unit/store/test_resp.py",),
             "callers queued behind a failed connect each try again (k callers: k timeouts)"),
    Mutation("resp-follow-never-silent", "meshd/store/engines/resp.py",
             "                    silent.deadline = trio.current_time() + ping_every + timeout",
             "                    silent.deadline = trio.current_time() + 3600",
             ("tests/unit/store/test_resp.py",),
             "a subscription that went silent is never noticed"),
    Mutation("pgpipe-reads-for-unsent-calls", "meshd/store/engines/pgpipe.py",
             "        while self.sent and not self.closed and not pg.is_busy():",
             "        while self.waiting and not self.closed and not pg.is_busy():",
             ("tests/integration/test_engine_pgpipe.py",),
             "answers handed to calls libpq has not been sent yet (a desync)"),
    Mutation("pgpipe-held-up-connection-keeps-taking-calls", "meshd/store/engines/pgpipe.py",
             "        flowing = trio.current_time() + self.timeout - STUCK",
             "        flowing = trio.current_time() - self.timeout + STUCK",
             ("tests/integration/test_engine_pgpipe.py",),
             "calls queue behind a statement waiting on another client's row lock"),
    Mutation("pgpipe-nul-truncated", "meshd/store/engines/pgpipe.py",
             '    if "\\x00" in text:',
             "    if False:",
             ("tests/integration/test_engine_pgpipe.py",),
             "a key with NUL is cut short by libpq instead of refused"),
    Mutation("store-fast-path-skips-the-checks", "meshd/store/ops.py",
             "                checked = self._store_args(args, write)\n"
             "            except MeshError:\n                return False\n"
             "            return bool(fast(checked, finish))",
             "                checked = {**args, \"database\": args.get(\"database\")}\n"
             "            except MeshError:\n                return False\n"
             "            return bool(fast(checked, finish))",
             ("tests/integration/test_store_fast_path.py",),
             "the store's fast path answers without checking the caller"),
    # -- issue 22: store records on disk behind a bounded cache ---------------------------
    Mutation("store-cache-unbounded", "meshd/store/cache.py",
             "        while self.bytes > self.max_bytes:\n",
             "        while self.bytes > self.max_bytes * 1000:\n",
             ("tests/unit/store/test_records.py",),
             "the record cache grows past store.cache_bytes (memory grows with the keys)"),
    Mutation("store-reads-older-change-while-committing", "meshd/store/diskrecords.py",
             "        for layer in (self.pending, self.committing):\n",
             "        for layer in (self.committing, self.pending):\n",
             ("tests/unit/store/test_records.py",),
             "a key written again while its last write is being committed reads the old value"),
    Mutation("store-evicted-record-wrong-hash", "meshd/store/persist.py",
             "        return (row[0][0], unsigned(row[0][1])) if row else None\n",
             "        return (row[0][0], row[0][1]) if row else None\n",
             ("tests/unit/store/test_records.py",),
             "a record read back from disk after eviction carries a wrong hash (digests drift)"),
    Mutation("store-bucket-chunks-repeat-buckets", "meshd/store/state.py",
             "        for b in dict.fromkeys(b for b in buckets if",
             "        for b in list(b for b in buckets if",
             ("tests/unit/store/test_records_bounds.py",),
             "a peer naming one bucket N times makes N reads of its keys (DoS)"),
    Mutation("store-tick-dies-on-disk-error", "meshd/store/replication.py",
             "            except self.backend_errors as exc:",
             "            except () as exc:",
             ("tests/unit/store/test_records_bounds.py",),
             "a SQLite error in tombstone collection escapes the timer tick"),
    Mutation("store-commit-caches-every-change", "meshd/store/diskrecords.py",
             "                if ck in hot and key not in newer:\n",
             "                if key not in newer:\n",
             ("tests/unit/store/test_records_bounds.py", "tests/unit/store/test_records.py"),
             "a commit caches every record it wrote: a catch-up pushes the hot set out"),
    Mutation("store-merge-read-fills-cache", "meshd/store/state.py",
             "        old = self.records.get(db, tbl, key, fill=False) if (db, tbl) in",
             "        old = self.records.get(db, tbl, key, fill=True) if (db, tbl) in",
             ("tests/unit/store/test_records_bounds.py",),
             "merging into a cold key caches it, evicting a hot one"),
    Mutation("store-key-list-reads-past-the-budget", "meshd/store/replication.py",
             "                    if budget <= 0:\n                        done = ",
             "                    if False:\n                        done = ",
             ("tests/unit/store/test_records_bounds.py",),
             "answering a key list reads every named bucket's hashes after the records are full"),
    Mutation("store-page-reads-the-whole-table", "meshd/store/state.py",
             "        stop = offset + limit if limit > 0 and offset >= 0 else 0\n",
             "        stop = 0\n",
             ("tests/unit/store/test_records_bounds.py",),
             "store.list with a limit reads every key of the table"),
    Mutation("store-commit-caches-a-superseded-change", "meshd/store/diskrecords.py",
             "                if ck in hot and key not in newer:\n",
             "                if ck in hot:\n",
             ("tests/unit/store/test_records_bounds.py", "tests/unit/store/test_records.py"),
             "a commit caches a change written over since: reads go back to the older value"),
    Mutation("lww-tiebreak-ignores-node", "meshd/store/crdt.py",
             "return a if lww_ts(a) >= lww_ts(b) else b",
             "return a if lww_ts(a)[:2] >= lww_ts(b)[:2] else b",
             ("tests/unit/store/test_lww_ties.py",),
             "LWW merge compares (wall, counter) only, not the node id"),
    Mutation("token-expiry-uncached-only", "meshd/auth/tokens.py",
             "        if not isinstance(exp, int | float) or now > exp + self.leeway:",
             "        if cached is None and (not isinstance(exp, int | float)"
             " or now > exp + self.leeway):",
             ("tests/unit/auth/test_token_lifetime.py",),
             "expiry checked only on the first, uncached verification"),
    Mutation("token-leeway-doubled", "meshd/auth/tokens.py",
             "now > exp + self.leeway",
             "now > exp + 2 * self.leeway",
             ("tests/unit/auth/test_token_lifetime.py",),
             "expiry leeway doubled"),
    Mutation("rules-deny-first-removed", "meshd/auth/rules.py",
             'applicable.sort(key=lambda r: (-r.priority, r.access != "denied", r.id))',
             "applicable.sort(key=lambda r: (-r.priority, r.id))",
             ("tests/unit/auth/test_rule_ties.py",),
             "a denial no longer beats a grant at equal priority"),
    Mutation("frames-nonce-wraps-at-256", "meshd/secure/frames.py",
             'return b"\\x00\\x00\\x00\\x00" + n.to_bytes(8, "big")',
             'return b"\\x00\\x00\\x00\\x00" + (n % 256).to_bytes(8, "big")',
             ("tests/unit/secure/test_frames.py",),
             "the nonce counter wraps at 256 (nonce reuse)"),
    Mutation("frames-length-cap-x64", "meshd/secure/frames.py",
             "n > self.max_frame + TAG_BYTES",
             "n > self.max_frame * 64 + TAG_BYTES",
             ("tests/unit/secure/test_frames.py",),
             "a peer's frame length is capped at 64 times the limit"),
    Mutation("routing-hysteresis-5-percent", "meshd/routing/table.py",
             "switch_gain: float = 0.10",
             "switch_gain: float = 0.05",
             ("tests/unit/routing/test_hysteresis.py",),
             "routes switch for a 5% gain instead of 10%"),
    Mutation("rtt-last-sample", "meshd/routing/rtt.py",
             "        samples.append(rtt)\n        return statistics.median(samples)",
             "        samples.append(rtt)\n        return samples[-1]",
             ("tests/unit/routing/test_rtt_filter.py",),
             "the filter returns the last sample, not the median"),
    Mutation("token-cache-disabled", "meshd/auth/tokens.py",
             "        cached = self._cache.get(token)",
             "        cached = None",
             ("tests/unit/auth/test_token_lifetime.py",
              "tests/unit/auth/test_auth.py::test_good_token_verifies_and_is_cached"),
             "every verification checks the signature again"),
    Mutation("hlc-observe-ignores-remote-wall", "meshd/hlc.py",
             "            self.wall, self.counter = wall, counter + 1",
             "            self.counter = counter + 1",
             ("tests/unit/test_hlc.py",),
             "observe() does not move the clock to a remote wall ahead of it"),
    # -- neighbours of those rules, which the same tests pin ------------------------------
    Mutation("membership-dead-not-gossiped", "meshd/membership/core.py",
             "        rec = self._set_dead(i, m, msg.incarnation, state, now)\n"
             "        self._broadcast(name, msg)\n",
             "        rec = self._set_dead(i, m, msg.incarnation, state, now)\n",
             ("tests/unit/membership/test_core.py",),
             "a node that declares a member dead keeps it to itself"),
    Mutation("membership-suspect-needs-newer", "meshd/membership/core.py",
             "if msg.incarnation < m.incarnation or m.state in (DEAD, LEFT):",
             "if msg.incarnation <= m.incarnation or m.state in (DEAD, LEFT):",
             ("tests/unit/membership/test_incarnations.py",),
             "a Suspect at the member's own incarnation is ignored"),
    Mutation("lww-ts-drops-node", "meshd/store/crdt.py",
             "    return (t[0], t[1], t[2])",
             '    return (t[0], t[1], "")',
             ("tests/unit/store/test_lww_ties.py",),
             "the timestamp a register is compared by loses its node id"),
    Mutation("token-nbf-leeway-doubled", "meshd/auth/tokens.py",
             "now < nbf - self.leeway",
             "now < nbf - 2 * self.leeway",
             ("tests/unit/auth/test_token_lifetime.py",),
             "not-before leeway doubled"),
    Mutation("token-cache-skips-key-check", "meshd/auth/tokens.py",
             "        if cached is not None and cached[1] not in self.keys():",
             "        if False:",
             ("tests/unit/auth/test_token_lifetime.py",),
             "a cached token outlives its signing key"),
    Mutation("token-cache-skips-revocation", "meshd/auth/tokens.py",
             '        if self.revoked(str(claims.get("jti"))):',
             '        if cached is None and self.revoked(str(claims.get("jti"))):',
             ("tests/unit/auth/test_token_lifetime.py",),
             "a cached token outlives its revocation"),
    Mutation("frames-nonce-send-counter-stuck", "meshd/secure/frames.py",
             "        self._send_n += 1",
             "        self._send_n += 0",
             ("tests/unit/secure/test_frames.py",),
             "every frame is sealed with nonce 0"),
    Mutation("routing-hysteresis-boundary", "meshd/routing/table.py",
             "weight > old_weight * (1 - self.switch_gain)",
             "weight >= old_weight * (1 - self.switch_gain)",
             ("tests/unit/routing/test_hysteresis.py",),
             "a new best exactly switch_gain cheaper no longer switches"),
    Mutation("routing-hysteresis-off", "meshd/routing/table.py",
             "            if old is not None and old.path != best.path:",
             "            if False:",
             ("tests/unit/routing/test_hysteresis.py",),
             "no hysteresis: every cheaper path is taken at once"),
    Mutation("routing-avoided-last-hop-cost", "meshd/routing/table.py",
             'dist[nbr] + data["weight"] < best[0]',
             'dist[nbr] - data["weight"] < best[0]',
             ("tests/unit/routing/test_table_rules.py",),
             "an avoided destination's last hop chosen by a wrong cost"),
    Mutation("auth-default-does-not-govern-rule-less-namespaces", "meshd/auth/service.py",
             "        if home == DEFAULT and not own:",
             "        if False:",
             ("tests/unit/auth/test_namespaces.py",),
             "default's accounts lose the rules written for them on other config trees"),
    Mutation("rtt-get-last-sample", "meshd/routing/rtt.py",
             "return statistics.median(samples) if samples else None",
             "return samples[-1] if samples else None",
             ("tests/unit/routing/test_rtt_filter.py",),
             "get() returns the last sample, not the median"),
    Mutation("hlc-drift-bound-exclusive", "meshd/hlc.py",
             "wall - physical > self.max_drift_ms",
             "wall - physical >= self.max_drift_ms",
             ("tests/unit/test_hlc.py",),
             "a remote wall exactly at the drift bound is refused"),
    Mutation("hlc-observe-counter-not-bumped", "meshd/hlc.py",
             "            self.counter = max(self.counter, counter) + 1",
             "            self.counter = max(self.counter, counter)",
             ("tests/unit/test_hlc.py",),
             "observing a timestamp at our wall can yield an equal later one"),
    # -- membership rules whose mutmut mutants survived tests/unit/membership ------------
    Mutation("membership-ack-rtt-sum", "meshd/membership/core.py",
             "_record_rtt(self._t, ti, now - waiter.start, now,  # type: ignore[arg-type]\n"
             "                            self._unreached)\n"
             "                self._direct_misses.pop",
             "_record_rtt(self._t, ti, now + waiter.start, now,  # type: ignore[arg-type]\n"
             "                            self._unreached)\n"
             "                self._direct_misses.pop",
             ("tests/unit/membership/test_acks.py",),
             "a probe's RTT is recorded as now + start instead of now - start"),
    Mutation("membership-direct-misses-strict", "meshd/membership/core.py",
             "if misses >= DIRECT_MISSES:",
             "if misses > DIRECT_MISSES:",
             ("tests/unit/membership/test_acks.py",),
             "a member answering only through helpers is marked unreached one probe late"),
    Mutation("membership-udp-unreachable-any-ack", "meshd/membership/core.py",
             "if reliable and target is not None:",
             "if reliable or target is not None:",
             ("tests/unit/membership/test_acks.py",),
             "every acked probe reports the member udp-unreachable"),
    Mutation("membership-routed-hop-not-heard", "meshd/membership/core.py",
             "self._t.probe_data(hi).heard_at = now",
             "pass",
             ("tests/unit/membership/test_acks.py",),
             "an ack relayed by a routed probe's hop does not show the hop alive"),
    Mutation("membership-random-live-needs-two", "meshd/membership/core.py",
             "if n == 0 or k <= 0:",
             "if n <= 1 or k <= 0:",
             ("tests/unit/membership/test_gossip_rules.py",),
             "a node with one live peer never gossips or push-pulls to it"),
    Mutation("membership-helper-may-be-excluded", "meshd/membership/core.py",
             "if cand in exclude or cand in chosen:",
             "if cand in exclude and cand in chosen:",
             ("tests/unit/membership/test_probe_rules.py",),
             "in a large cluster the probed member is asked to help probe itself"),
    Mutation("membership-merge-stops-at-stale", "meshd/membership/core.py",
             "continue  # older news than ours",
             "break  # older news than ours",
             ("tests/unit/membership/test_merge_rules.py",),
             "a push-pull merge stops at the first state older than ours"),
    Mutation("membership-gossip-stops-at-subject", "meshd/membership/core.py",
             "continue  # nothing for this one",
             "break  # nothing for this one",
             ("tests/unit/membership/test_gossip_rules.py",),
             "a gossip round ends at a target that only has news about itself (the bug)"),
    Mutation("membership-suspicion-timer-stale-at-deadline", "meshd/membership/core.py",
             "entry[0] < sus.deadline()",
             "entry[0] <= sus.deadline()",
             ("tests/unit/membership/test_timers.py",),
             "next_deadline() drops a suspicion's timer due exactly at its deadline"),
    # -- broker (issue 14) ---------------------------------------------------------------
    Mutation("broker-group-every-local-member", "meshd/broker/service.py",
             "            sub = self._one_of(ns, group, patterns)\n"
             "            if sub is not None:\n"
             "                got += await sub.inbox.deliver(wired)\n",
             "            for sub in [s for p in patterns\n"
             "                        for s in self._by_key.get((ns, p, group), ())]:\n"
             "                got += await sub.inbox.deliver(wired)\n",
             ("tests/integration/test_broker.py::"
              "test_a_queue_group_across_two_nodes_takes_1000_messages_exactly_once",),
             "a node gives a queue group's copy to every local member, not one"),
    Mutation("broker-core-reaches-durable-groups", "meshd/broker/service.py",
             "queues=_not_durable)",
             "queues=None)",
             ("tests/integration/test_broker.py::test_delayed_delivery_waits_until_due",),
             "core delivery also goes to durable subscribers (early and twice)"),
    Mutation("broker-settle-from-any-member", "meshd/broker/origin.py",
             "        if peer is not None:\n            allowed =",
             "        if False:\n            allowed =",
             ("tests/unit/broker/test_origin.py", "tests/integration/test_attacks_broker.py"),
             "an origin takes acks for a delivery from a node it never delivered it to"),
    Mutation("consumer-absorbed-acks-offered", "meshd/broker/consumer.py",
             "            if self._is_acked(seq):\n                continue",
             "            if False:\n                continue",
             ("tests/unit/broker/test_consumer.py",),
             "messages acked elsewhere while the origin was down are offered again"),
    # -- issue 14, hot paths: multiplexed control connections, batch caches --------------------
    Mutation("mux-reply-to-the-reader", "meshd/control.py",
             'waiter = self._pending.get(frame.get("id")) if isinstance(frame, dict)',
             "waiter = mine if isinstance(frame, dict)",
             ("tests/unit/test_control.py",),
             "a multiplexed client hands every reply it reads to its own call"),
    Mutation("mux-takes-streams", "meshd/control.py",
             'if op is not None and op.kind != "call":',
             "if False:",
             ("tests/unit/test_control.py",),
             "a stream or session is run inside a multiplexed connection"),
    Mutation("broker-group-route-reused", "meshd/broker/interest.py",
             "return not self.unserved and not any(c.groups for c in self.copies.values())",
             "return True",
             ("tests/unit/broker/test_interest.py",),
             "a publisher's batch reuses a queue group's chosen member for every message"),
    # -- issue 15, debug and observability ----------------------------------------------------
    Mutation("debug-logs-of-another-node", "meshd/debug/logs.py",
             "        if NODE.get() != self.node:\n",
             "        if False:\n",
             ("tests/unit/debug/test_logs_stats.py",),
             "a node's log buffer takes the records of every node in its process"),
    Mutation("debug-service-names-itself", "meshd/debug/logs.py",
             '"node": node, "service": service,',
             '"node": node, "service": raw.get("service", service),',
             ("tests/unit/debug/test_logs_stats.py",),
             "a service's log record says which service it is of"),
    Mutation("debug-member-answers-as-another", "meshd/debug/answers.py",
             '"level": r["level"], "node": node,',
             '"level": r["level"], "node": r.get("node", node),',
             ("tests/unit/debug/test_answers.py",),
             "a member's log records keep the node they claim"),
    Mutation("debug-log-bytes-unbounded", "meshd/debug/logs.py",
             "(self.bytes > self.max_bytes",
             "(False",
             ("tests/unit/debug/test_logs_stats.py",),
             "the log buffer is bounded by count only"),
    Mutation("debug-series-unbounded", "meshd/debug/stats.py",
             "        if len(table) >= cap:",
             "        if False:",
             ("tests/unit/debug/test_logs_stats.py",),
             "call stats grow a series for every name a caller makes up"),
    Mutation("debug-no-log-quota", "meshd/debug/service.py",
             "            if self._log_quota.take(instance, now):",
             "            if False:",
             ("tests/unit/debug/test_answers.py",),
             "a local instance ships log records without a quota"),
    Mutation("trace-unsampled-child-sampled", "meshd/debug/traces.py",
             "self.span_id(), parent.sampled or force)",
             "self.span_id(), True)",
             ("tests/unit/debug/test_traces.py",),
             "a hop samples a trace its root decided not to keep"),
    Mutation("trace-error-spans-dropped", "meshd/debug/traces.py",
             "        if (ctx.sampled or status) and ctx is not OFF:\n"
             "            self.spans.add_raw((ctx.trace_id, ctx.span_id,",
             "        if ctx.sampled and ctx is not OFF:\n"
             "            self.spans.add_raw((ctx.trace_id, ctx.span_id,",
             ("tests/unit/debug/test_traces.py",),
             "a failed span of a trace not sampled is dropped"),
    Mutation("relay-tags-unsampled-calls", "meshd/transport/links.py",
             'and tp[-1] == "1"',
             "",
             ("tests/unit/debug/test_answers.py",),
             "relays learn the trace context of calls that are not sampled"),
    # -- link callback paths (issue 22, hot paths) ------------------------------------------
    Mutation("link-hook-overtakes-the-queue", "meshd/transport/links.py",
             "elif self.hook is not None and not self._queued and self._stash is None",
             "elif self.hook is not None and self._stash is None",
             ("tests/unit/secure/test_link_callbacks.py",),
             "a channel's hook takes a message while earlier ones wait in its queue"),
    Mutation("simultaneous-dial-loser-closes-at-once", "meshd/transport/links.py",
             "0 if link.initiator_id == old.initiator_id else DRAIN_GRACE)",
             "0)",
             ("tests/unit/transport/test_simultaneous_dial.py",),
             "a link that lost a simultaneous dial closes under a channel the peer opened"),
    Mutation("tunnel-setup-not-retried", "meshd/proxy/tunnels.py",
             "if attempt == 2 or not ch.link.closed:",
             "if True:",
             ("tests/integration/test_hardening.py",),
             "a tunnel whose link died during setup fails instead of trying a fresh link"),
    # -- issue 23: what the nemesis found ---------------------------------------------------
    Mutation("outbox-drop-not-handed-back", "meshd/broker/links.py",
             "        if self.on_drop is not None and items:",
             "        if False:",
             ("tests/unit/broker/test_outbox_drop.py",),
             "a delivery the outbox could not send is not returned: it counts as an attempt"),
    Mutation("unsent-delivery-counts-an-attempt", "meshd/broker/durable.py",
             'self.origin.settle(key, "return", [item["seq"]], UNSENT_DELAY, time.time(),',
             'self.origin.settle(key, "nak", [item["seq"]], UNSENT_DELAY, time.time(),',
             ("tests/unit/broker/test_outbox_drop.py",),
             "an unsent durable delivery spends one of max_deliver attempts"),
    Mutation("registry-stale-boot-kept", "meshd/registry/replication.py",
             "        if source is not None and self.boot is not None:",
             "        if False:",
             ("tests/unit/registry/test_core.py",),
             "a restarted node's instances of earlier boots stay in every registry for ever"),
    Mutation("may-offer-misses-new-messages", "meshd/broker/consumer.py",
             "                    or (self._room() and (self.walked < self.last or (",
             "                    or (self._room() and (False or (",
             ("tests/unit/broker/test_consumer.py",),
             "the deliverer skips a consumer whose new messages wait: they are never offered"),
    Mutation("registry-owner-index-stale", "meshd/registry/core.py",
             "            del owned[e.key]\n",
             "            pass\n",
             ("tests/unit/registry/test_core.py",),
             "a collected tombstone stays in the owner index and is shipped in repairs"),
    Mutation("store-push-before-commit", "meshd/store/service.py",
             "if self.records.pending or self.records.committing:  # on disk first: rules",
             "if False:",
             ("tests/unit/store/test_durability.py",),
             "a push leaves before the commit: kill -9 then swallows the node's next increments"),
    Mutation("or-set-tag-without-life", "meshd/store/service.py",
             'tag = f"{self.node}:{ts[0]}:{ts[1]}:{self._life}"',
             'tag = f"{self.node}:{ts[0]}:{ts[1]}"',
             ("tests/unit/store/test_durability.py",),
             "a node restarted with its clock set back makes a tag it made before"),
    Mutation("interest-digest-cache-stale", "meshd/broker/interest.py",
             "        if self._digest[0] != self.changes:\n",
             "        if self._digest[0] == -1:\n",
             ("tests/unit/broker/test_interest.py",),
             "a node's interest digest stays as it first was: anti-entropy never repairs"),
    Mutation("alive-peers-cache-stale", "meshd/membership/core.py",
             "        if version != self.member_version:\n            addrs = [r.addr",
             "        if version == -1:\n            addrs = [r.addr",
             ("tests/unit/membership/test_core.py",),
             "replicators keep pushing to members that died and never to those that came back"),
    Mutation("set-merge-drops-new-tags", "meshd/store/crdt.py",
             "        elif have != tags:\n",
             "        elif not have:\n",
             ("tests/unit/store/test_crdt.py",),
             "an add merged into a set that already holds the element is lost"),
    Mutation("registry-collected-tombstone-returns", "meshd/registry/replication.py",
             "                    and old is None:",
             "                    and False:",
             ("tests/unit/registry/test_core.py",),
             "a tombstone one node collected comes back from a peer that still holds it"),
    Mutation("ledger-acked-increment-not-counted", "sim/checker.py",
             "            cled.acked += op.delta\n",
             "            cled.acked += 0\n",
             ("tests/sim/test_history.py",),
             "the checkers forget acknowledged increments: a lost one passes"),
    Mutation("history-offers-not-counted", "sim/history.py",
             "        self.offers[pair] = self.offers.get(pair, 0) + 1\n",
             "        self.offers[pair] = self.offers.get(pair, 0) + 2\n",
             ("tests/sim/test_history.py",),
             "the event-log checker lets a queue group get a message more often than offered"),
    Mutation("history-offers-ignored", "sim/history.py",
             "            over = self.received[pair] - self.offers.get(pair, 0)\n",
             "            over = self.received[pair] - 1\n",
             ("tests/sim/test_history.py",),
             "the event-log checker takes a redelivered message handed over twice as a duplicate"),
    Mutation("history-reads-one-store-view", "sim/history.py",
             "            for i in sorted(set(d[\"store\"].values())):\n",
             "            for i in sorted(set(d[\"store\"].values()))[:1]:\n",
             ("tests/sim/test_history.py",),
             "the event-log checker judges the first node's store view only"),
    Mutation("send-nowait-ignores-the-window", "meshd/transport/links.py",
             "self._send_lock.locked() or self._send_window < cost or",
             "self._send_lock.locked() or",
             ("tests/unit/secure/test_link_callbacks.py",),
             "send_nowait sends past the peer's flow-control window"),
    Mutation("raw-receive-never-yields", "meshd/transport/rawio.py",
             "            if self._streak >= YIELD_EVERY:",
             "            if False:",
             ("tests/unit/secure/test_link_callbacks.py",),
             "a link that always has data to read starves the other tasks"),
    Mutation("served-reply-frees-its-slot-early", "meshd/rpc/remote.py",
             "_send_reply, ch, payload, self.deadline, self.slots)\n        return True",
             "_send_reply, ch, payload, self.deadline, self.slots)\n        return False",
             ("tests/unit/transport/test_rpc_fast_paths.py",),
             "a caller granting no window piles up replies past the channel's call slots"),
    # -- the API gateway (issue 16) --------------------------------------------------------
    Mutation("remote-request-acts-as-node", "meshd/ops.py",
             "    return None if REQUEST_REMOTE.get() else node",
             "    return node",
             ("tests/unit/test_ops.py",),
             "a request from outside without a token acts as the node"),
    Mutation("gateway-cookie-from-any-origin", "meshd/gateway/policy.py",
             '    return text != _origin_of(scheme, header(headers, b"host"))',
             "    return False",
             ("tests/unit/gateway/test_routes_policy.py",),
             "another site's page may act with a visitor's meshd_token cookie (CSRF)"),
    Mutation("gateway-both-framings-taken", "meshd/gateway/http11.py",
             '    return b"content-length" in names and b"transfer-encoding" in names',
             "    return False",
             ("tests/unit/gateway/test_routes_policy.py",),
             "a request with Content-Length and Transfer-Encoding is served (smuggling)"),
    Mutation("gateway-upstream-any-address", "meshd/gateway/upstream.py",
             "            loopback = ipaddress.ip_address(host).is_loopback",
             "            loopback = True",
             ("tests/unit/gateway/test_routes_policy.py",),
             "an HTTP service may name another host's address (request forgery)"),
    Mutation("gateway-token-rate-unlimited", "meshd/gateway/policy.py",
             "        if token and self.tokens is not None:",
             "        if False:",
             ("tests/unit/gateway/test_routes_policy.py",),
             "a token's requests are not rate-limited"),
    # -- the web dashboard (issue 17) --------------------------------------------------------
    Mutation("web-any-host", "meshd/web/app.py",
             "        self._check_host(headers, scope)\n",
             "",
             ("tests/unit/web/test_app.py",),
             "the dashboard answers any Host (a rebound DNS name reads it)"),
    Mutation("web-any-origin", "meshd/web/app.py",
             '    if origin not in (b"http://" + host, b"https://" + host):',
             "    if False:",
             ("tests/unit/web/test_app.py",),
             "another site's page may call the dashboard's API"),
    Mutation("web-any-content-type", "meshd/web/app.py",
             "        if kind != JSON:",
             "        if False:",
             ("tests/unit/web/test_app.py",),
             "an HTML form of another site may post to the API (no preflight)"),
    Mutation("web-stream-not-admitted", "meshd/web/app.py",
             "                self.table.admit(op, args)\n                with self.slots.hold():",
             "                with self.slots.hold():",
             ("tests/unit/web/test_app.py",),
             "a stream op runs without its caller being admitted"),
    Mutation("rollout-moves-all-at-once", "meshd/runtime/rollout.py",
             "    if old:\n        move(old[0], version)",
             "    if old:\n        for slot in old:\n            move(slot, version)",
             ("tests/unit/runtime/test_rollout.py",),
             "a rolling update replaces every replica at once"),
    Mutation("rollout-crash-not-failed", "meshd/runtime/rollout.py",
             'CRASHED = ("restarting", "crashed", "exited", "failed")',
             'CRASHED = ("failed",)',
             ("tests/unit/runtime/test_rollout.py",),
             "a new version that crashes and restarts is rolled on"),
    Mutation("health-check-never-restarts", "meshd/runtime/process.py",
             "                if now - missing_since >= self.health_grace:",
             "                if now - missing_since >= self.health_grace * 1000:",
             ("tests/unit/runtime/test_process.py",),
             "a replica whose registration went away is never restarted"),
    Mutation("leftover-pid-reuse", "meshd/runtime/procfiles.py",
             "            if ok and start_time(item.pid) == item.start:",
             "            if ok and start_time(item.pid) is not None:",
             ("tests/unit/runtime/test_procfiles.py",),
             "a record names whatever process now has its pid"),
    Mutation("remote-checked-op-without-token", "meshd/ops.py",
             'or (op.access == "checked" and not op.anonymous)',
             'or (op.access == "checked" and False)',
             ("tests/unit/test_ops.py",),
             "a remote caller without a token runs a checked op whose handler may act as "
             "the node"),
    Mutation("bot-command-trusts-the-body", "sdk/bot.py",
             "            req.user = verified_user()  # never what the body says\n",
             "",
             ("tests/unit/bot/test_sdk_command.py",),
             "a service command believes the user the request's body names"),
    Mutation("bot-seen-evicts-before-lookup", "meshd/bot/slack.py",
             "        if event_id in self.ids:\n            return False\n"
             "        while len(self.ids) >= self.most:\n"
             "            self.ids.popitem(last=False)\n",
             "        while len(self.ids) >= self.most:\n"
             "            self.ids.popitem(last=False)\n"
             "        if event_id in self.ids:\n            return False\n",
             ("tests/unit/bot/test_seen.py",),
             "a retried event is run again when the dedupe is full"),
    Mutation("bot-reply-cut-before-escape", "meshd/bot/core.py",
             "        body = self.body(lambda t: len(escape(t)))\n",
             "        body = self.body()\n",
             ("tests/unit/bot/test_core.py",),
             "a reply's Slack section exceeds 3000 characters after escaping"),
    Mutation("engine-redact-keeps-quoted-password", "meshd/store/engines/base.py",
             """(password\\s*=\\s*)('(?:[^'\\\\]|\\\\.)*'?|\\S+)""",
             """(password\\s*=\\s*)(\\S+)""",
             ("tests/unit/store/test_engine_names.py",),
             "a quoted keyword password with a space is only partly redacted"),
    Mutation("engine-redact-keeps-userinfo", "meshd/store/engines/base.py",
             'text = _USERINFO.sub(r"\\g<scheme><credentials>@", text)',
             "text = text",
             ("tests/unit/store/test_engine_names.py",),
             "user:password@ of a URL left in error texts"),
    Mutation("redis-names-without-lengths", "meshd/store/engines/redis.py",
             'return str(len(raw)).encode() + b":" + raw',
             'return raw + b":"',
             ("tests/unit/store/test_engine_names.py",),
             "Redis names joined by a separator: (\"a:b\", \"c\") and (\"a\", \"b:c\") collide"),
    Mutation("key-hash-ascii-keys-by-code-point", "meshd/store/records.py",
             "        out.sort(key=len)\n",
             "        pass\n",
             ("tests/unit/store/test_key_hash.py",),
             "ASCII keys of different lengths hashed in code point order, not canonical CBOR's:"
             " replicas of this and older versions disagree on every digest"),
    Mutation("registry-tombstone-collected-twice", "meshd/registry/core.py",
             "                    old[e.key] = e\n",
             "                    old[f\"{e.key}#{len(old)}\"] = e\n",
             ("tests/unit/registry/test_core.py",),
             "a key stored twice as a tombstone comes up twice from the heap: a KeyError"),
    Mutation("memrecords-bucket-of-first-key-only", "meshd/store/memrecords.py",
             "        if key not in t:\n",
             "        if not t:\n",
             ("tests/unit/store/test_records.py",),
             "the memory backend knows the bucket of a table's first key only"),
    # -- fast calls' deadlines: answered calls must not wait for their deadline ----------
    Mutation("deadlines-never-compacted", "meshd/rpc/deadlines.py",
             "        if len(heap) >= self._compact_at:\n",
             "        if False:\n",
             ("tests/unit/test_rpc_deadlines.py",),
             "answered calls behind a slow one stay until its deadline (GC pauses)"),
    Mutation("deadlines-finished-top-kept", "meshd/rpc/deadlines.py",
             "            while heap and heap[0][2].finished:\n"
             "                heapq.heappop(heap)\n",
             "            pass\n",
             ("tests/unit/test_rpc_deadlines.py",),
             "answered calls leave only at compactions: thousands held at a time"),
    Mutation("deadlines-finished-expired", "meshd/rpc/deadlines.py",
             "            if not call.finished:\n                out.append(call)\n",
             "            out.append(call)\n",
             ("tests/unit/test_rpc_deadlines.py",),
             "a call answered already is expired too (a second answer, a 408)"),
    Mutation("deadlines-add-to-the-old-heap", "meshd/rpc/deadlines.py",
             "            heap = self._compact()\n",
             "            self._compact()\n",
             ("tests/unit/test_rpc_deadlines.py",),
             "the call added as the heap is rebuilt goes to the old list: never expired"),
    Mutation("deadlines-wake-per-call", "meshd/rpc/deadlines.py",
             "        if deadline < self._planned:\n",
             "        if not self._heap[1:] or deadline < self._planned:\n",
             ("tests/unit/test_rpc_deadlines.py",),
             "one call in flight at a time wakes the expiry task on every call"),
    Mutation("deadlines-threshold-stays-high", "meshd/rpc/deadlines.py",
             "                out.append(call)\n        self._lower()\n",
             "                out.append(call)\n",
             ("tests/unit/test_rpc_deadlines.py",),
             "after a burst drains, answered calls pile up to twice the burst"),
    Mutation("gc-snapshot-not-retried", "meshd/debug/gcpauses.py",
             "            if [s.count for s in self.series.values()] == counts:\n",
             "            if True:\n",
             ("tests/unit/debug/test_metrics.py",),
             "a pause counted while a scrape copies the series: count and sum disagree"),
    Mutation("gc-nested-watch-hooks-twice", "meshd/debug/gcpauses.py",
             "        if self._hooked:\n",
             "        if False:\n",
             ("tests/unit/debug/test_metrics.py",),
             "a nested watch hooks a second time: every pause counted twice"),
]


class SetupError(Exception):
    pass


def _copy_tree(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".hypothesis")
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)
    for name, folder in RENAMED.items():  # the import names the distribution gives them
        (dest / name).symlink_to(folder, target_is_directory=True)


def _apply(tree: Path, m: Mutation) -> None:
    path = tree / m.file
    text = path.read_text()
    count = text.count(m.original)
    if count != 1:
        raise SetupError(f"{m.name}: the original text occurs {count} times in {m.file} "
                         f"(expected once): {m.original!r}")
    path.write_text(text.replace(m.original, m.mutant))


def _env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _pytest(tree: Path, tests: tuple[str, ...]) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "pytest", "-rf", "-p", "no:cacheprovider",
           "-p", "no:randomly", *tests]
    try:
        proc = subprocess.run(cmd, cwd=tree, env=_env(tree), capture_output=True, text=True,
                              timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        return -1, "timeout"
    return proc.returncode, proc.stdout + proc.stderr


def _failed(output: str) -> list[str]:
    return re.findall(r"^FAILED (\S+)", output, re.MULTILINE)


def _check_imports(tree: Path) -> None:
    """The copy's packages, not an installed meshd, must be the ones the tests import."""
    out = subprocess.run([sys.executable, "-c", "import meshd; print(meshd.__file__)"],
                         cwd=tree, env=_env(tree), capture_output=True, text=True)
    where = Path(out.stdout.strip() or "?").resolve()
    if tree.resolve() not in where.parents:
        raise SetupError(f"tests would import meshd from {where}, not from the copy {tree}")


def _baseline(selected: list[Mutation]) -> None:
    tests = tuple(dict.fromkeys(t for m in selected for t in m.tests))
    with tempfile.TemporaryDirectory(prefix="meshd-mut-") as tmp:
        tree = Path(tmp)
        _copy_tree(tree)
        _check_imports(tree)
        for m in selected:  # every pattern must still be there before anything runs
            text = (tree / m.file).read_text()
            if text.count(m.original) != 1:
                _apply(tree, m)  # raises with the reason
        code, out = _pytest(tree, tests)
        if code != 0:
            raise SetupError("the catching tests fail on the unmutated code:\n" + out[-3000:])
        passed = re.search(r"(\d+) passed", out)
        print(f"BASELINE: {passed.group(1) if passed else '?'} tests in {len(tests)} "
              f"files/ids pass on the unmutated code")


def run(m: Mutation) -> bool:
    """True if the mutation is caught."""
    with tempfile.TemporaryDirectory(prefix="meshd-mut-") as tmp:
        tree = Path(tmp)
        _copy_tree(tree)
        _apply(tree, m)
        code, out = _pytest(tree, m.tests)
    if code == -1:
        print(f"MUTATION {m.name}: CAUGHT (tests timed out after {TIMEOUT} s)")
        return True
    failed = _failed(out)
    if code != 0 and failed:
        print(f"MUTATION {m.name}: CAUGHT by {len(failed)} test(s): {', '.join(failed)}")
        return True
    if code != 0:
        print(f"MUTATION {m.name}: CAUGHT (pytest exit {code}, no test named)\n{out[-2000:]}")
        return True
    print(f"MUTATION {m.name}: SURVIVED ({m.file}: {m.what}; ran {' '.join(m.tests)})")
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("names", nargs="*", metavar="NAME", help="only these mutations")
    args = parser.parse_args(argv)
    by_name = {m.name: m for m in MUTATIONS}
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        print(f"unknown mutation(s): {', '.join(unknown)} (see --list)", file=sys.stderr)
        return 2
    selected = [by_name[n] for n in args.names] if args.names else MUTATIONS
    if args.list:
        for m in selected:
            print(f"{m.name}\n    {m.file}: {m.what}\n    - {m.original.strip()}\n"
                  f"    + {m.mutant.strip()}\n    tests: {' '.join(m.tests)}")
        return 0
    try:
        _baseline(selected)
        survived = [m.name for m in selected if not run(m)]
    except SetupError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 2
    print(f"{len(selected) - len(survived)} of {len(selected)} mutations caught"
          + (f"; SURVIVED: {', '.join(survived)}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
