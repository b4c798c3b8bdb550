"""The plug-in's `changes` against the rbd CLI's own `rbd diff` (an independent reader of the same
OSD metadata), with and without fast-diff, across clone-swap reverts, and on bad input.

Needs a cluster: scripts/ceph-cluster start, then CEPH_CONF (and CEPH_POOL, default vmsnap).
"""

import json
import subprocess
import unittest

import test_rbd_plugin as base
from test_rbd_plugin import CONF, MiB, helper, run_plan

OBJECT = 4 * MiB


def merged(extents):
    """Sorted (offset, length, zero) with adjacent runs of one kind joined."""
    out = []
    for offset, length, zero in sorted(extents):
        if out and out[-1][0] + out[-1][1] == offset and out[-1][2] == zero:
            out[-1] = (out[-1][0], out[-1][1] + length, zero)
        else:
            out.append((offset, length, zero))
    return out


def plugin_extents(answer):
    return merged((e["offset"], e["length"], bool(e.get("zero", False))) for e in answer["extents"])


def rbd_diff(spec, from_snap, whole_object):
    """`rbd diff` of `spec` (image or image@snap) since `from_snap`, as merged extents."""
    argv = ["rbd", "-c", CONF, "diff", "--format", "json", spec]
    if from_snap:
        argv += ["--from-snap", from_snap]
    if whole_object:
        argv.append("--whole-object")
    out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60).stdout
    return merged((e["offset"], e["length"], e["exists"] != "true") for e in json.loads(out))


class RbdChangesTests(base.RbdPluginTests):
    def changes(self, layout, base, to=None):
        view = {"snapshot": to} if to else {"active": True}
        return self.p.ok("changes", {"from": base, "to": view, "layout": layout})

    def discard(self, disk, offset, length):
        helper("img = rbd.Image(io, sys.argv[1]); img.discard(int(sys.argv[2]), int(sys.argv[3])); img.close()",
               disk.split("/", 1)[1], str(offset), str(length))

    def build(self, fast_diff):
        """s1: data in objects 0 and 5; s2: +object 3, object 5 discarded; head: +object 6."""
        if fast_diff:
            disk, layout = self.new_disk(32 * MiB)
        else:   # an image made outside vmsnap with layering only: no object map
            name = f"ut-plain-{self._testMethodName[5:][:30]}"
            helper("rbd.RBD().create(io, sys.argv[1], 32 << 20, old_format=False, features=rbd.RBD_FEATURE_LAYERING)",
                   name)
            disk = f"{base.POOL}/{name}"
            self.addCleanup(self.destroy, disk)
            layout = self.p.ok("adopt", {"locator": disk})
        self.write(layout, 100, b"a" * 5000)
        self.write(layout, 5 * OBJECT, b"b" * OBJECT)
        layout, _ = self.create(layout, "s1")
        self.write(layout, 3 * OBJECT + 4096, b"c" * 8192)
        self.discard(disk, 5 * OBJECT, OBJECT)
        layout, _ = self.create(layout, "s2")
        self.write(layout, 6 * OBJECT + 512, b"d" * 512)
        return disk, layout

    def test_changes_match_rbd_diff_with_fast_diff(self):
        disk, layout = self.build(fast_diff=True)
        answer = self.changes(layout, "s1", "s2")
        self.assertEqual(answer["method"], "rbd-fast-diff")
        self.assertEqual(answer["granularity"], OBJECT)
        self.assertEqual(answer["virtualSize"], 32 * MiB)
        got = plugin_extents(answer)
        self.assertEqual(got, rbd_diff(f"{disk}@s2", "s1", whole_object=True))
        self.assertEqual(got, [(3 * OBJECT, OBJECT, False), (5 * OBJECT, OBJECT, True)])
        now = plugin_extents(self.changes(layout, "s1"))
        self.assertEqual(now, rbd_diff(disk, "s1", whole_object=True))
        self.assertIn((6 * OBJECT, OBJECT, False), now)
        self.assertEqual(plugin_extents(self.changes(layout, "s2")), [(6 * OBJECT, OBJECT, False)])

    def test_changes_match_rbd_diff_without_object_map(self):
        disk, layout = self.build(fast_diff=False)
        answer = self.changes(layout, "s1", "s2")
        self.assertEqual(answer["method"], "rbd-diff")
        got = plugin_extents(answer)
        self.assertEqual(got, rbd_diff(f"{disk}@s2", "s1", whole_object=False))
        # Exact: an object created since s1 counts up to its written end, not as a whole object.
        self.assertIn((3 * OBJECT, 4096 + 8192, False), got)
        self.assertEqual(plugin_extents(self.changes(layout, "s2")), rbd_diff(disk, "s2", whole_object=False))
        self.assertEqual(plugin_extents(self.changes(layout, "s2")), [(6 * OBJECT, 512 + 512, False)])

    def test_changes_after_a_rollback_and_the_other_way_round(self):
        disk, layout = self.build(fast_diff=True)
        plan = self.p.ok("planRevert", {"snapshot": "s1", "layout": layout})
        layout = run_plan(self.p, plan)
        # The head now reads as s1: object 3 is gone (zero), object 5 holds data again. The
        # rollback rewrote object 0 too, so the object map counts it as changed: more, never less.
        back = plugin_extents(self.changes(layout, "s2"))
        self.assertEqual(back, rbd_diff(disk, "s2", whole_object=True))
        self.assertIn((3 * OBJECT, OBJECT, True), back)
        self.assertIn((5 * OBJECT, OBJECT, False), back)
        # s1 asked from s2, the other way round: counted from s1 to s2, every extent data.
        self.assertEqual(plugin_extents(self.changes(layout, "s2", "s1")),
                         [(3 * OBJECT, OBJECT, False), (5 * OBJECT, OBJECT, False)])

    def test_changes_through_clone_swaps(self):
        disk, layout = self.build(fast_diff=True)
        self.p.ok("configure", {"settings": {"revert-mode": "clone"}})
        layout = run_plan(self.p, self.p.ok("planRevert", {"snapshot": "s1", "layout": layout}))
        self.assertEqual(plugin_extents(self.changes(layout, "s1")), [])
        self.write(layout, 2 * OBJECT, b"e" * 4096)
        # The clone's own object, then nothing of its parent: s1 is the point it was cloned at.
        self.assertEqual(plugin_extents(self.changes(layout, "s1")), [(2 * OBJECT, OBJECT, False)])
        # s2 lives in the image set aside: its objects since s1, and the clone's own.
        self.assertEqual(plugin_extents(self.changes(layout, "s2")),
                         [(2 * OBJECT, 2 * OBJECT, False), (5 * OBJECT, OBJECT, False)])
        layout, _ = self.create(layout, "s3")
        self.assertEqual(plugin_extents(self.changes(layout, "s1", "s3")), [(2 * OBJECT, OBJECT, False)])

    def test_changes_refused_for_unknown_snapshots_and_views(self):
        disk, layout = self.build(fast_diff=True)
        err = self.p.error("changes", {"from": "nope", "to": {"active": True}, "layout": layout})
        self.assertEqual(err["code"], "notFound")
        self.assertIn("'nope'", err["message"])
        err = self.p.error("changes", {"from": "s1", "to": {"snapshot": "gone"}, "layout": layout})
        self.assertEqual(err["code"], "notFound")
        err = self.p.error("changes", {"from": "s1", "to": {"elsewhere": 1}, "layout": layout})
        self.assertEqual(err["code"], "invalidArgument")

    # The inherited protocol tests run once, in test_rbd_plugin.
    def test_describe(self):
        self.assertTrue(self.p.ok("describe")["reportsChanges"])


for name in [n for n in dir(base.RbdPluginTests) if n.startswith("test_") and n not in vars(RbdChangesTests)]:
    setattr(RbdChangesTests, name, None)

if __name__ == "__main__":
    unittest.main()
