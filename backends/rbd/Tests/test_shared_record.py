"""Two hosts, one RBD disk: the snapshot tree, current snapshot and journal live in the cluster.

"Host A" and "host B" are two vmsnap installations with separate local stores (--store), driving
the real `vmsnap` binary against a live one-node cluster. Needs CEPH_CONF (and CEPH_POOL), and
VMSNAP (the vmsnap binary; default .build/debug/vmsnap). Anything that must happen behind
vmsnap's back (writing the image, holding the lock as a third host) runs in /usr/bin/python3,
which has Debian's python3-rados and python3-rbd.
"""

import contextlib
import json
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
BACKEND_DIR = os.path.dirname(HERE)
ROOT = os.path.dirname(os.path.dirname(BACKEND_DIR))
VMSNAP = os.environ.get("VMSNAP", os.path.join(ROOT, ".build", "debug", "vmsnap"))
CONF = os.environ.get("CEPH_CONF", "")
POOL = os.environ.get("CEPH_POOL", "vmsnap")
SYSTEM_PYTHON = "/usr/bin/python3"
MiB = 1 << 20

PRELUDE = (
    "import json, os, sys, time, rados, rbd\n"
    "c = rados.Rados(conffile=os.environ['CEPH_CONF']); c.connect(timeout=10)\n"
    "io = c.open_ioctx(os.environ['CEPH_POOL'])\n"
)


def ceph(code, *args, timeout=60):
    """Run `code` after PRELUDE in the system Python; return its stdout."""
    env = dict(os.environ, CEPH_CONF=CONF, CEPH_POOL=POOL)
    done = subprocess.run([SYSTEM_PYTHON, "-c", PRELUDE + code, *args], env=env, capture_output=True,
                          timeout=timeout, text=True)
    if done.returncode != 0:
        raise AssertionError(f"helper failed: {done.stderr}")
    return done.stdout


def ceph_cli(*args, timeout=30):
    """The `ceph` command against the test cluster; its stdout."""
    done = subprocess.run(["ceph", "--connect-timeout", "10", *args], env=dict(os.environ, CEPH_CONF=CONF),
                          capture_output=True, timeout=timeout, text=True)
    if done.returncode != 0:
        raise AssertionError(f"ceph {' '.join(args)} failed: {done.stderr}")
    return done.stdout


@contextlib.contextmanager
def osd_stopped():
    """The cluster's one OSD stopped, then started again. memstore keeps the data in the OSD's
    memory, so the daemon is not killed: the monitor marks it down and `noup` keeps it from
    coming back (to clients, an OSD that is gone: no placement group serves I/O), then `noup`
    is lifted and the OSD boots and peers again, as a restarted OSD does. (Freezing the daemon
    with SIGSTOP instead left ops on one object stuck in the OSD for minutes once in CI.)"""
    ceph_cli("osd", "set", "noup")
    try:
        ceph_cli("osd", "down", "0")
        deadline = time.monotonic() + 30
        while json.loads(ceph_cli("osd", "stat", "-f", "json"))["num_up_osds"] != 0:
            if time.monotonic() > deadline:
                raise AssertionError("osd.0 was not marked down within 30 s")
            time.sleep(0.2)
        yield
    finally:
        ceph_cli("osd", "unset", "noup")
        wait_for_active_pgs()


def wait_for_active_pgs(within=90):
    """Until the OSD is up and serves I/O in every placement group of the pool again (there is
    no mgr for `ceph pg stat`: an object written and read in each PG says it)."""
    deadline = time.monotonic() + within
    while json.loads(ceph_cli("osd", "stat", "-f", "json"))["num_up_osds"] != 1:
        if time.monotonic() > deadline:
            raise AssertionError(f"osd.0 did not come up within {within} s")
        time.sleep(0.2)
    pgs = json.loads(ceph_cli("osd", "pool", "get", POOL, "pg_num", "-f", "json"))["pg_num"]
    ceph("c.conf_set('rados_osd_op_timeout', '10')\n"
         "seen, deadline = set(), time.monotonic() + float(sys.argv[2])\n"
         "n = 0\n"
         "while len(seen) < int(sys.argv[1]):\n"
         "    name = f'pg-probe-{n}'; n += 1\n"
         "    pg = c.mon_command(json.dumps({'prefix': 'osd map', 'pool': os.environ['CEPH_POOL'], "
         "'object': name, 'format': 'json'}), b'')[1]\n"
         "    pgid = json.loads(pg)['pgid']\n"
         "    if pgid in seen: continue\n"
         "    while True:\n"
         "        try: io.write_full(name, b'probe'); io.read(name); io.remove_object(name); break\n"
         "        except rados.TimedOut:\n"
         "            if time.monotonic() > deadline: raise\n"
         "    seen.add(pgid)\n", str(pgs), str(within), timeout=within + 30)


@unittest.skipUnless(CONF and os.path.exists(CONF), "needs a Ceph cluster (scripts/ceph-cluster start; CEPH_CONF)")
@unittest.skipUnless(os.access(VMSNAP, os.X_OK), f"needs the vmsnap binary ({VMSNAP}; swift build)")
class TwoHosts(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="vmsnap-two-hosts-")
        self.stores = {h: os.path.join(self.dir, h) for h in ("A", "B")}
        self.image = f"shared-{secrets.token_hex(4)}"
        self.disk = f"{POOL}/{self.image}"
        ceph("rbd.RBD().create(io, sys.argv[1], 64 << 20, old_format=False, features=rbd.RBD_FEATURE_LAYERING | "
             "rbd.RBD_FEATURE_EXCLUSIVE_LOCK | rbd.RBD_FEATURE_OBJECT_MAP | rbd.RBD_FEATURE_FAST_DIFF)", self.image)

    def tearDown(self):
        ceph("img = rbd.Image(io, sys.argv[1])\n"
             "[img.remove_snap(s['name']) for s in list(img.list_snaps())]\n"
             "img.close(); rbd.RBD().remove(io, sys.argv[1])\n"
             "try: io.remove_object('vmsnap_disk.' + sys.argv[1])\n"
             "except rados.ObjectNotFound: pass\n", self.image)
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- helpers ---------------------------------------------------------------------------------

    def env(self, **extra):
        env = dict(os.environ, CEPH_CONF=CONF, VMSNAP_BACKEND_PATH=BACKEND_DIR)
        env.pop("VMSNAP_FAULT", None)
        env.update(extra)
        return env

    def vmsnap(self, host, *args, ok=True, **extra):
        done = subprocess.run([VMSNAP, *args, "--store", self.stores[host]], env=self.env(**extra),
                              capture_output=True, text=True, timeout=120)
        if ok and done.returncode != 0:
            raise AssertionError(f"host {host}: vmsnap {' '.join(args)} failed ({done.returncode}): {done.stderr}")
        return done

    def listing(self, host):
        return json.loads(self.vmsnap(host, "disk", "snapshot", "list", self.disk, "--json").stdout)

    def tree(self, host):
        got = self.listing(host)
        return {s["name"]: s.get("parent") for s in got["snapshots"]}, got.get("current"), got["unfinished"]

    def write(self, byte, offset=0, length=MiB):
        ceph("img = rbd.Image(io, sys.argv[1]); img.write(bytes([int(sys.argv[2])]) * int(sys.argv[4]), "
             "int(sys.argv[3])); img.flush(); img.close()", self.image, str(byte), str(offset), str(length))

    def first_byte(self, snapshot=None):
        return int(ceph("img = rbd.Image(io, sys.argv[1], snapshot=(sys.argv[2] or None), read_only=True)\n"
                        "print(img.read(0, 1)[0]); img.close()", self.image, snapshot or ""))

    def rbd_snapshots(self):
        return sorted(json.loads(ceph("img = rbd.Image(io, sys.argv[1], read_only=True)\n"
                                      "print(json.dumps([s['name'] for s in img.list_snaps()])); img.close()",
                                      self.image)))

    def document(self):
        return json.loads(ceph("print(io.read('vmsnap_disk.' + sys.argv[1], 1 << 20).decode())", self.image))

    # -- tests -----------------------------------------------------------------------------------

    def test_host_b_sees_and_reverts_what_host_a_took(self):
        self.write(1)
        self.vmsnap("A", "disk", "snapshot", "create", self.disk, "s1", "--description", "before the upgrade")
        self.write(2)
        self.vmsnap("A", "disk", "snapshot", "create", self.disk, "s2")
        self.write(3)

        tree, current, unfinished = self.tree("B")
        self.assertEqual(tree, {"s1": None, "s2": "s1"})
        self.assertEqual(current, "s2")
        self.assertEqual(unfinished, [])
        self.assertEqual(self.listing("B")["snapshots"][0].get("description"), "before the upgrade")

        self.vmsnap("B", "disk", "snapshot", "revert", self.disk, "s1")
        self.assertEqual(self.first_byte(), 1)
        self.assertEqual(self.tree("A")[1], "s1", "host A sees host B's revert")

        self.vmsnap("A", "disk", "snapshot", "create", self.disk, "s3")
        self.vmsnap("B", "disk", "snapshot", "delete", self.disk, "s2")
        tree, current, _ = self.tree("A")
        self.assertEqual(tree, {"s1": None, "s3": "s1"})
        self.assertEqual(current, "s3")
        self.assertEqual(self.rbd_snapshots(), ["s1", "s3"])
        # Host A's own store was brought up to date too, not only its listing.
        self.assertEqual(self.vmsnap("A", "recover").stdout.strip(), "nothing to recover")

    def test_a_clone_swap_revert_is_the_other_hosts_too(self):
        self.write(1)
        self.vmsnap("A", "disk", "snapshot", "create", self.disk, "s1")
        self.write(2)
        self.vmsnap("A", "disk", "snapshot", "create", self.disk, "s2")
        self.write(3)
        self.vmsnap("A", "disk", "snapshot", "revert", self.disk, "s1", "--set", "revert-mode=clone")
        self.assertEqual(self.first_byte(), 1)
        frozen = [n for n in self.images() if n.startswith(self.image + ".vmsnap-")]
        self.assertEqual(len(frozen), 1, self.images())
        # Host B, new to the disk, takes the record naming the image set aside, and deletes
        # through it: s2 lives in the frozen image; s1 has the active image as its clone.
        self.assertEqual(self.tree("B"), ({"s1": None, "s2": "s1"}, "s1", []))
        self.vmsnap("B", "disk", "snapshot", "delete", self.disk, "s2")
        self.vmsnap("B", "disk", "snapshot", "delete", self.disk, "s1")
        self.assertEqual(self.first_byte(), 1, "the flattened image keeps the reverted data")
        self.assertEqual([n for n in self.images() if n.startswith(self.image + ".vmsnap-")], [])
        self.assertEqual(self.tree("A"), ({}, None, []))

    def images(self):
        return json.loads(ceph("print(json.dumps(rbd.RBD().list(io)))"))

    def test_a_held_lock_refuses_after_the_wait_and_serializes(self):
        self.vmsnap("A", "disk", "snapshot", "create", self.disk, "s1")
        self.write(7)
        holder = subprocess.Popen(
            [SYSTEM_PYTHON, "-c", PRELUDE +
             "obj = 'vmsnap_disk.' + sys.argv[1]\n"
             "io.lock_exclusive(obj, 'vmsnap', 'host-c', 'host C, a test', 60, 0)\n"
             "io.set_xattr(obj, 'vmsnap.holder', json.dumps({'cookie': 'host-c', 'holder': 'host C (test)', "
             "'address': c.get_addrs()}).encode())\n"
             "print('held', flush=True); sys.stdin.readline()\n"
             "io.rm_xattr(obj, 'vmsnap.holder'); io.unlock(obj, 'vmsnap', 'host-c')\n", self.image],
            env=self.env(CEPH_POOL=POOL), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            self.assertEqual(holder.stdout.readline().strip(), "held")
            refused = self.vmsnap("B", "disk", "snapshot", "revert", self.disk, "s1", ok=False, VMSNAP_LOCK_WAIT="1")
            self.assertNotEqual(refused.returncode, 0)
            self.assertIn("is locked by host C (test)", refused.stderr)
            self.assertEqual(self.first_byte(), 7, "nothing changed")

            started = time.monotonic()
            waiting = subprocess.Popen([VMSNAP, "disk", "snapshot", "revert", self.disk, "s1", "--store",
                                        self.stores["B"]], env=self.env(), stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
            time.sleep(2)
            self.assertIsNone(waiting.poll(), "host B waits for the lock")
            self.assertEqual(self.first_byte(), 7, "and changes nothing while it waits")
            holder.stdin.write("release\n")
            holder.stdin.flush()
            out, err = waiting.communicate(timeout=60)
            self.assertEqual(waiting.returncode, 0, err)
            self.assertRegex(err, r"waited \d+\.\d{3} s for the cluster lock on disk .* \(held by host C \(test\)\)")
            self.assertGreaterEqual(time.monotonic() - started, 2)
            self.assertEqual(self.first_byte(), 0, "the revert ran once the lock was free")
        finally:
            if holder.poll() is None:
                holder.kill()
            holder.communicate()

    def test_two_hosts_reverting_at_once_are_serialized(self):
        self.vmsnap("A", "disk", "snapshot", "create", self.disk, "s1")
        self.write(5)
        self.vmsnap("A", "disk", "snapshot", "create", self.disk, "s2")
        self.vmsnap("B", "disk", "snapshot", "list", self.disk)
        generation = self.document()["generation"]
        runs = [subprocess.Popen([VMSNAP, "disk", "snapshot", "revert", self.disk, name, "--store", self.stores[h]],
                                 env=self.env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
                for h, name in (("A", "s1"), ("B", "s2"))]
        results = [r.communicate(timeout=120) for r in runs]
        for r, (_, err) in zip(runs, results):
            self.assertEqual(r.returncode, 0, err)
        document = self.document()
        self.assertEqual(document["content"]["journals"], [])
        # Each revert wrote at least begin, completion and release: none of them was lost.
        self.assertGreaterEqual(document["generation"], generation + 6)
        current = document["content"]["layout"]["disk"]["current"]
        self.assertEqual(self.first_byte(), 0 if current == "s1" else 5, f"the image holds {current}")
        self.assertEqual(self.tree("A")[1], current)
        self.assertEqual(self.tree("B")[1], current)

    def test_a_killed_host_leaves_a_journal_the_other_host_finishes(self):
        self.vmsnap("A", "disk", "snapshot", "create", self.disk, "s1")
        killed = self.vmsnap("A", "disk", "snapshot", "create", self.disk, "s2", ok=False,
                             VMSNAP_FAULT="after-step:0")
        self.assertEqual(killed.returncode, -signal.SIGKILL, killed.stderr)
        self.assertEqual(self.rbd_snapshots(), ["s1", "s2"], "the step ran before the kill")
        _, _, unfinished = self.tree("B")
        self.assertEqual(len(unfinished), 1)
        self.assertIn("create snapshot 's2'", unfinished[0])
        self.assertIn(f"store {self.stores['A']}", unfinished[0])

        done = self.vmsnap("B", "recover", "--disk", self.disk)
        self.assertIn("left open by", done.stderr)
        self.assertIn("completed", done.stderr)
        tree, current, unfinished = self.tree("B")
        self.assertEqual((tree, current, unfinished), ({"s1": None, "s2": "s1"}, "s2", []))
        # Host A still has its own open entry; its recovery must not run it again.
        again = self.vmsnap("A", "recover")
        self.assertEqual(again.stdout.strip(), "nothing to recover", again.stderr)
        self.assertEqual(self.tree("A"), ({"s1": None, "s2": "s1"}, "s2", []))

    def open_journal_ids(self, host):
        with contextlib.closing(sqlite3.connect(os.path.join(self.stores[host], "vmsnap.sqlite"))) as db:
            return [row[0] for row in db.execute("SELECT id FROM journal WHERE state = 'open'")]

    def test_an_abandoned_operation_is_given_up_for_every_host(self):
        self.vmsnap("A", "disk", "snapshot", "create", self.disk, "s1")
        killed = self.vmsnap("A", "disk", "snapshot", "create", self.disk, "s2", ok=False,
                             VMSNAP_FAULT="after-step:0")
        self.assertEqual(killed.returncode, -signal.SIGKILL, killed.stderr)
        [journal] = self.open_journal_ids("A")
        given_up = self.vmsnap("A", "recover", "--abandon", str(journal))
        self.assertIn("abandoned: create snapshot 's2'", given_up.stdout)
        # The record no longer holds it: no host runs it again; the metadata is as before the
        # create, the storage as the step left it.
        self.assertEqual(self.document()["content"]["journals"], [])
        self.assertEqual(self.tree("B"), ({"s1": None}, "s1", []))
        self.assertEqual(self.vmsnap("B", "recover").stdout.strip(), "nothing to recover")
        self.assertEqual(self.rbd_snapshots(), ["s1", "s2"])

        # Finished by host B in the meantime: host A's id names nothing open any more.
        killed = self.vmsnap("A", "disk", "snapshot", "create", self.disk, "s3", ok=False,
                             VMSNAP_FAULT="after-step:0")
        self.assertEqual(killed.returncode, -signal.SIGKILL, killed.stderr)
        [journal] = self.open_journal_ids("A")
        self.vmsnap("B", "recover", "--disk", self.disk)
        late = self.vmsnap("A", "recover", "--abandon", str(journal), ok=False)
        self.assertEqual(late.returncode, 1, late.stderr)
        self.assertIn("no longer open in the shared record", late.stderr)
        self.assertEqual(self.tree("A"), ({"s1": None, "s3": "s1"}, "s3", []))

    def test_a_killed_host_before_its_step_is_rolled_back_by_the_other(self):
        self.vmsnap("A", "disk", "snapshot", "create", self.disk, "s1")
        killed = self.vmsnap("A", "disk", "snapshot", "create", self.disk, "s2", ok=False,
                             VMSNAP_FAULT="before-step:0")
        self.assertEqual(killed.returncode, -signal.SIGKILL, killed.stderr)
        self.vmsnap("B", "recover", "--disk", self.disk)
        self.assertEqual(self.tree("A"), ({"s1": None}, "s1", []))
        self.assertEqual(self.rbd_snapshots(), ["s1"])

    def test_a_stalled_host_is_fenced_when_its_lease_runs_out(self):
        self.vmsnap("A", "disk", "snapshot", "create", self.disk, "s1")
        # "Host C" takes the lock with a 3 s lease and stops renewing it (a host that hangs).
        # Host B waits for the lease, takes the lock over, and blocklists host C's client, so
        # host C's late write is refused by the cluster.
        stalled = subprocess.Popen(
            [SYSTEM_PYTHON, "-c", PRELUDE +
             "obj = 'vmsnap_disk.' + sys.argv[1]\n"
             "io.lock_exclusive(obj, 'vmsnap', 'host-c', 'host C', 3, 0)\n"
             "io.set_xattr(obj, 'vmsnap.holder', json.dumps({'cookie': 'host-c', 'holder': 'host C (stalled)', "
             "'address': c.get_addrs()}).encode())\n"
             "print('held', flush=True); sys.stdin.readline()\n"
             "c.conf_set('rados_osd_op_timeout', '5')\n"
             "try:\n"
             "    io.write_full(obj, b'late write from host C'); print('written')\n"
             "except rados.Error as e: print('refused', type(e).__name__)\n", self.image],
            env=self.env(CEPH_POOL=POOL), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            self.assertEqual(stalled.stdout.readline().strip(), "held")
            took = self.vmsnap("B", "disk", "snapshot", "create", self.disk, "s2")
            self.assertIn("took over the cluster lock on disk", took.stderr)
            self.assertIn("host C (stalled)", took.stderr)
            stalled.stdin.write("go\n")
            stalled.stdin.flush()
            out, _ = stalled.communicate(timeout=60)
            self.assertIn("refused", out, "the stalled host was fenced")
        finally:
            if stalled.poll() is None:
                stalled.kill()
            stalled.communicate()
        self.assertEqual(self.tree("A"), ({"s1": None, "s2": "s1"}, "s2", []))

    def test_an_osd_stopped_mid_snapshot_leaves_a_journal_that_recovers(self):
        self.vmsnap("A", "disk", "snapshot", "create", self.disk, "s1")
        run = subprocess.Popen([VMSNAP, "disk", "snapshot", "create", self.disk, "s2", "--store", self.stores["A"],
                                "--set", "timeout=3", "--set", "lock-lease=5"],
                               env=self.env(VMSNAP_FAULT="delay-before-step:0:4"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while not self.document()["content"]["journals"]:
                self.assertLess(time.monotonic(), deadline, "the create never journaled its start")
                time.sleep(0.2)
            with osd_stopped():
                _, err = run.communicate(timeout=180)
        finally:
            if run.poll() is None:
                run.kill()
                run.communicate()
        if os.environ.get("VMSNAP_TEST_VERBOSE"):
            print(err)
        self.assertNotEqual(run.returncode, 0)
        self.assertIn("is the cluster up?", err)
        self.assertIn("vmsnap recover", err)
        self.assertEqual(len(self.document()["content"]["journals"]), 1, "the journal stays open in the record")

        done = self.vmsnap("B", "recover", "--disk", self.disk)
        self.assertIn("rolled-back", done.stderr)
        self.assertEqual(self.rbd_snapshots(), ["s1"])
        self.assertEqual(self.tree("A"), ({"s1": None}, "s1", []))
        self.assertEqual(self.vmsnap("A", "recover").stdout.strip(), "nothing to recover")

    def test_a_corrupt_shared_record_is_refused_and_left_alone(self):
        self.vmsnap("A", "disk", "snapshot", "create", self.disk, "s1")
        ceph("io.write_full('vmsnap_disk.' + sys.argv[1], b'{not json')", self.image)
        for args in (("disk", "snapshot", "list", self.disk), ("disk", "snapshot", "create", self.disk, "s2")):
            bad = self.vmsnap("B", *args, ok=False)
            self.assertNotEqual(bad.returncode, 0)
            self.assertIn("is not a vmsnap document", bad.stderr)
        self.assertEqual(self.rbd_snapshots(), ["s1"], "nothing was changed")
        self.assertEqual(ceph("print(io.read('vmsnap_disk.' + sys.argv[1]).decode())", self.image).strip(),
                         "{not json")


if __name__ == "__main__":
    unittest.main()
