"""Editing a region of a slide label store: read, write back, pyramid and manifest kept consistent."""

import json

import numpy as np
import pytest
from scipy import ndimage as ndi

from glas_seg.backend.errors import GlasSegError
from glas_seg.backend.slide_edit import (
    clip_box, labels_digest, read_labels_region, write_labels_region,
)
from glas_seg.backend.slide_segment import MANIFEST, STORE_CHUNK, build_pyramid, open_labels


def store_labels(height=1300, width=1100):
    """Objects of a slide region: a bar across the whole width (id 1), squares (2, 3, 7), a disk (9)."""
    labels = np.zeros((height, width), np.uint32)
    labels[100:140, 20:1080] = 1
    labels[300:360, 300:380] = 2
    labels[600:650, 900:980] = 3
    labels[1100:1200, 100:200] = 7
    yy, xx = np.mgrid[:height, :width]
    labels[(yy - 800) ** 2 + (xx - 500) ** 2 < 40**2] = 9
    return labels


def make_label_store(path, labels, complete=True, origin=(0, 0), mpp=2.0):
    """A label store laid out as ``segment_slide`` writes it: level 0 in STORE_CHUNK chunks, the
    display pyramid, and the manifest's objects table (area, box, probability sum)."""
    import zarr

    group = zarr.open_group(str(path), mode="w")
    group.create_array("0", shape=labels.shape, chunks=(STORE_CHUNK, STORE_CHUNK), dtype="uint32", fill_value=0)
    group["0"][:] = labels
    levels = build_pyramid(group)
    group.attrs.update({"levels": levels, "origin": list(origin), "mpp": mpp, "task": "glands", "model": "fake"})
    objects = {}
    for index, box in enumerate(ndi.find_objects(labels.astype(np.int64)), start=1):
        if box is not None:
            area = int((labels[box] == index).sum())
            objects[str(index)] = {"area": area, "box": [box[0].start, box[1].start, box[0].stop, box[1].stop],
                                   "p": [0.9 * area, area]}
    manifest = {"fingerprint": "test", "settings": {}, "done": [0], "next_id": int(labels.max()) + 1,
                "objects": objects, "complete": complete}
    (path / MANIFEST).write_text(json.dumps(manifest))
    return path


def manifest(path):
    return json.loads((path / MANIFEST).read_text())


def assert_pyramid_follows_level0(path):
    levels = open_labels(path)
    base = levels[0][:]
    assert len(levels) >= 3
    for k, level in enumerate(levels[1:], start=1):
        np.testing.assert_array_equal(level[:], base[:: 2**k, :: 2**k], err_msg=f"level {k}")


def assert_table_matches(path):
    """Every object's area and box in the manifest are those of level 0."""
    base = open_labels(path)[0][:].astype(np.int64)
    objects = manifest(path)["objects"]
    found = {index: box for index, box in enumerate(ndi.find_objects(base), start=1) if box is not None}
    assert sorted(int(k) for k in objects) == sorted(found)
    for index, box in found.items():
        entry = objects[str(index)]
        assert entry["area"] == int((base == index).sum()), index
        assert entry["box"] == [box[0].start, box[1].start, box[0].stop, box[1].stop], index


@pytest.fixture
def store(tmp_path):
    return make_label_store(tmp_path / "slide_labels.zarr", store_labels())


def test_read_region_clips_and_refuses_bad_boxes(store):
    truth = store_labels()
    np.testing.assert_array_equal(read_labels_region(store, (250, 420, 280, 400)), truth[250:420, 280:400])
    # A box overhanging the store is clipped to it.
    assert read_labels_region(store, (1250, 1400, -10, 50)).shape == (50, 50)
    assert clip_box((1300, 1100), (1250, 1400, -10, 50)) == (1250, 1300, 0, 50)
    for bad in [(10, 5, 0, 10), (0, 10), ("a", 1, 2, 3), (2000, 2100, 0, 10)]:
        with pytest.raises(GlasSegError):
            read_labels_region(store, bad)
    with pytest.raises(GlasSegError, match="zoom in or draw a smaller region"):
        read_labels_region(store, (0, 1300, 0, 1100), max_pixels=1_000_000)
    with pytest.raises(GlasSegError, match="not a glas-seg label store"):
        read_labels_region(store.parent, (0, 10, 0, 10))


def test_write_back_changes_only_the_box_and_keeps_pyramid_and_table(store):
    before = open_labels(store)[0][:]
    next_id = manifest(store)["next_id"]
    # An odd box (not on the pyramid's 2- and 4-pixel grid) over square 2, the disk 9 and part of the bar 1.
    box = (95, 851, 251, 601)
    y0, y1, x0, x1 = box
    region = read_labels_region(store, box)
    edited = region.copy()
    edited[edited == 2] = 0                        # delete square 2 (wholly inside)
    edited[200:260, 10:70] = 3                     # paint with the id of square 3, which lies elsewhere
    edited[0:60, 200:300] = 1                      # grow the bar (crosses the box's border)
    edited[(edited == 9) & (np.arange(edited.shape[1]) < 250)] = 0  # cut the disk in half
    result = write_labels_region(store, box, edited, base=region)

    after = open_labels(store)[0][:]
    outside = np.ones(before.shape, bool)
    outside[y0:y1, x0:x1] = False
    np.testing.assert_array_equal(after[outside], before[outside])  # nothing outside the box changed
    assert result.renamed == {3: next_id}                              # the colliding id got a fresh one
    expected = edited.copy()
    expected[expected == 3] = next_id
    np.testing.assert_array_equal(after[y0:y1, x0:x1], expected)
    np.testing.assert_array_equal(result.labels, expected)
    assert result.removed == [2] and result.changed == int((expected != region).sum())
    assert_pyramid_follows_level0(store)
    assert_table_matches(store)
    m = manifest(store)
    assert m["next_id"] == next_id + 1 and m["complete"] is True
    assert m["objects"]["1"]["box"] == [95, 20, 155, 1080]             # the bar, grown upwards
    assert m["objects"]["3"]["area"] == 50 * 80                        # square 3 elsewhere untouched
    assert m["objects"]["9"]["p"] == manifest_p(store_labels(), 9)     # probability sum kept
    assert m["objects"][str(next_id)]["p"] == [0.0, 0]                 # a painted object has none


def manifest_p(labels, index):
    area = int((labels == index).sum())
    return [0.9 * area, area]


def test_new_ids_at_or_above_next_id_are_renumbered_and_free_ids_kept(tmp_path):
    path = make_label_store(tmp_path / "s.zarr", store_labels())
    next_id = manifest(path)["next_id"]
    region = read_labels_region(path, (0, 600, 0, 600))
    edited = region.copy()
    edited[400:450, 50:100] = 5          # a free id below next_id: kept
    edited[500:550, 50:100] = 70_000     # above next_id (reserved for a resumed run): renumbered
    result = write_labels_region(path, (0, 600, 0, 600), edited)
    assert result.renamed == {70_000: next_id}
    labels = open_labels(path)[0][:]
    assert (labels[500:550, 50:100] == next_id).all() and (labels[400:450, 50:100] == 5).all()
    assert manifest(path)["complete"] is True and manifest(path)["next_id"] == next_id + 1
    assert_table_matches(path)
    assert_pyramid_follows_level0(path)


def test_unfinished_segmentations_are_not_written(tmp_path):
    """A running (or interrupted) segment_slide holds its own object table and next id in memory
    and would overwrite what an edit wrote: refused, the store untouched."""
    path = make_label_store(tmp_path / "s.zarr", store_labels(), complete=False)
    before, table = open_labels(path)[0][:], manifest(path)
    edited = read_labels_region(path, (0, 600, 0, 600)).copy()
    edited[400:450, 50:100] = 5
    with pytest.raises(GlasSegError, match="has not finished"):
        write_labels_region(path, (0, 600, 0, 600), edited)
    np.testing.assert_array_equal(open_labels(path)[0][:], before)
    assert manifest(path) == table


def test_a_region_filled_by_one_object_is_written(store):
    """No background in the box (a fill inside a gland): one id only."""
    box = (300, 340, 300, 340)
    region = read_labels_region(store, box)
    index = int(region.max()) or 1
    write_labels_region(store, box, np.full(region.shape, index, np.uint32))
    assert (open_labels(store)[0][300:340, 300:340] == index).all()
    assert_table_matches(store)
    assert_pyramid_follows_level0(store)


def test_write_refuses_when_the_store_changed_since_read(store):
    box = (280, 380, 280, 400)
    mine, theirs = read_labels_region(store, box), read_labels_region(store, box)
    read_as = mine.copy()
    theirs[0:10, 0:10] = 2
    write_labels_region(store, box, theirs, base=labels_digest(read_as))  # the first writer wins
    written = open_labels(store)[0][:]
    table = manifest(store)
    mine[mine == 2] = 0
    for base in (read_as, labels_digest(read_as)):  # the labels as read, or their digest
        with pytest.raises(GlasSegError, match="changed on disk since it was opened"):
            write_labels_region(store, box, mine, base=base)
    np.testing.assert_array_equal(open_labels(store)[0][:], written)  # nothing was overwritten
    assert manifest(store) == table


def test_bad_writes_are_user_errors_and_write_nothing(store):
    before = open_labels(store)[0][:]
    region = read_labels_region(store, (0, 100, 0, 100))
    for box, labels, message in [
        ((0, 100, 0, 100), region[:50], "region is 100 x 100"),
        ((0, 100, 0, 100), region.astype(np.float32), "must be integers"),
        ((0, 100, 0, 100), region.astype(np.int32) - 1, "negative"),
        ((1250, 1350, 0, 100), region, "inside the labels"),
        ((0, 100), region, "4 integers"),
    ]:
        with pytest.raises(GlasSegError, match=message):
            write_labels_region(store, box, labels)
    assert write_labels_region(store, (0, 100, 0, 100), region).changed == 0
    np.testing.assert_array_equal(open_labels(store)[0][:], before)


def _edit(store):
    """An edit of a box over square 2 (deleted) and part of the disk 9, and its box."""
    box = (250, 851, 251, 601)
    edited = read_labels_region(store, box)
    edited[edited == 2] = 0
    edited[400:500, 200:300] = 0
    return box, edited


@pytest.mark.parametrize("killed_at", ["arrays", "manifest"])
def test_a_write_killed_half_way_leaves_the_labels_before_or_after_it(store, monkeypatch, killed_at):
    """A process killed after level 0 changed but before the manifest is written leaves the old
    labels once the store is opened again (the undo journal puts them back); killed after the
    manifest but before the journal is deleted, it leaves the new labels. Either way level 0, the
    display levels and the table agree, and the journal is gone."""
    import glas_seg.backend.slide_edit as slide_edit

    before = open_labels(store)[0][:]
    table_before = manifest(store)["objects"]
    box, edited = _edit(store)

    class Killed(BaseException):  # not an Exception: nothing in the write may catch it
        pass

    def die(*args, **kwargs):
        raise Killed

    if killed_at == "arrays":
        def paint_then_die(group, box, labels):  # level 0 and the display levels half changed
            group["0"][box[0]:box[1], box[2]:box[3]] = labels
            raise Killed

        monkeypatch.setattr(slide_edit, "_paint", paint_then_die)
    else:
        real_unlink = type(store).unlink
        monkeypatch.setattr(type(store), "unlink",
                            lambda self, *a, **k: die() if self.name == slide_edit.JOURNAL else real_unlink(self, *a, **k))
    with pytest.raises(Killed):
        write_labels_region(store, box, edited)
    monkeypatch.undo()
    journal = store / slide_edit.JOURNAL
    assert journal.is_file()
    if killed_at == "arrays":
        assert not np.array_equal(_raw_level0(store), before)  # half written on disk
    after = open_labels(store)[0][:]  # opening the store finishes the interrupted write
    assert not journal.exists()
    y0, y1, x0, x1 = box
    if killed_at == "arrays":
        np.testing.assert_array_equal(after, before)
        assert manifest(store)["objects"] == table_before
    else:
        np.testing.assert_array_equal(after[y0:y1, x0:x1], edited)
        assert "2" not in manifest(store)["objects"]
    assert_pyramid_follows_level0(store)
    assert_table_matches(store)
    # The store takes the next edit normally.
    write_labels_region(store, box, edited)
    np.testing.assert_array_equal(read_labels_region(store, box), edited)


def _raw_level0(path):
    import zarr

    return zarr.open_group(str(path), mode="r")["0"][:]


def test_an_interrupted_write_that_cannot_be_finished_is_a_clear_error(store):
    import glas_seg.backend.slide_edit as slide_edit

    (store / slide_edit.JOURNAL).write_bytes(b"not a journal")
    with pytest.raises(GlasSegError, match="interrupted label edit"):
        read_labels_region(store, (0, 10, 0, 10))


def test_a_write_that_fails_puts_the_old_labels_back_at_once(store, monkeypatch):
    """An ordinary error half-way (a full disk, say) leaves the store as it was right away, not only
    at its next opening, and no journal behind."""
    import glas_seg.backend.slide_edit as slide_edit

    before = _raw_level0(store)
    box, edited = _edit(store)

    real_paint = slide_edit._paint

    def paint_then_fail(group, box, labels):
        monkeypatch.setattr(slide_edit, "_paint", real_paint)  # putting the old labels back works
        group["0"][box[0]:box[1], box[2]:box[3]] = labels
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(slide_edit, "_paint", paint_then_fail)
    with pytest.raises(OSError, match="No space left"):
        write_labels_region(store, box, edited)
    assert not (store / slide_edit.JOURNAL).exists()
    np.testing.assert_array_equal(_raw_level0(store), before)  # read without the recovery of open_labels
    assert_pyramid_follows_level0(store)


def test_a_write_under_way_elsewhere_is_not_undone_by_a_reader(store):
    """A reader (another thread or process) that finds the journal while the writer still holds the
    store's lock leaves the write alone; once the lock is free, a leftover journal is finished."""
    from filelock import FileLock

    import glas_seg.backend.slide_edit as slide_edit

    before = _raw_level0(store)
    box, edited = _edit(store)
    y0, y1, x0, x1 = box
    with FileLock(store / slide_edit.LOCK):  # the writer, half-way: journal written, level 0 changed
        slide_edit._save_journal(store / slide_edit.JOURNAL, box, before[y0:y1, x0:x1], "token")
        import zarr

        zarr.open_group(str(store), mode="a")["0"][y0:y1, x0:x1] = edited
        assert slide_edit.finish_interrupted_write(store) is None
        np.testing.assert_array_equal(read_labels_region(store, box), edited)  # not rolled back under it
    assert slide_edit.finish_interrupted_write(store) == "undone"  # the writer died: now it is undone
    np.testing.assert_array_equal(_raw_level0(store), before)
