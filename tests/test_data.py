import numpy as np
import pytest
import torch
from skimage import io as skio

from glas_seg.backend.augment import Augmenter, fixed_hed_shift
from glas_seg.backend.data import PatchDataset, Sample, find_pairs, glas_split, patient_split, read_patients
from glas_seg.backend.errors import GlasSegError
from glas_seg.backend.training import TrainSettings


def test_patient_split_never_shares_a_patient():
    names = [f"img{i}" for i in range(40)]
    patients = {n: f"p{i % 7}" for i, n in enumerate(names)}
    train, val = patient_split(names, patients, val_fraction=0.25, seed=3)
    assert set(train).isdisjoint(val) and len(train) + len(val) == 40
    assert {patients[n] for n in train}.isdisjoint({patients[n] for n in val})
    assert len(val) >= 10
    assert patient_split(names, patients, 0.25, seed=3) == (train, val)  # deterministic


def test_glas_split_is_patient_wise(shared_data):
    train, val = glas_split(shared_data / "glas")
    patients = read_patients(shared_data / "glas" / "Grade.csv")
    assert len(train) + len(val) == 85 and 12 <= len(val) <= 25
    assert {patients[p[0]] for p in train}.isdisjoint({patients[p[0]] for p in val})


def test_find_pairs_glas_layout_and_two_folders(tmp_path):
    img = np.zeros((20, 20, 3), np.uint8)
    lab = np.zeros((20, 20), np.uint8)
    for name in ("b_2", "b_10"):
        skio.imsave(tmp_path / f"{name}.bmp", img, check_contrast=False)
        skio.imsave(tmp_path / f"{name}_anno.bmp", lab, check_contrast=False)
    assert [p[0] for p in find_pairs(tmp_path)] == ["b_2", "b_10"]
    (tmp_path / "imgs").mkdir(), (tmp_path / "labs").mkdir()
    skio.imsave(tmp_path / "imgs" / "x.png", img, check_contrast=False)
    skio.imsave(tmp_path / "labs" / "x.png", lab, check_contrast=False)
    pairs = find_pairs(tmp_path / "imgs", tmp_path / "labs")
    assert [(p[0], p[2].parent.name) for p in pairs] == [("x", "labs")]


def test_augmenter_moves_image_and_labels_together():
    rng = np.random.default_rng(0)
    labels = np.zeros((120, 140), np.int32)
    labels[30:70, 40:90] = 7
    image = np.where(labels[..., None] > 0, 0.9, 0.1).astype(np.float32) * np.ones(3, np.float32)
    image += rng.normal(0, 0.001, image.shape).astype(np.float32)
    aug = Augmenter(crop_size=64, seed=1)
    for _ in range(20):
        out_img, out_lab = aug(image, labels + 1)  # +1: 0 marks unknown/padded pixels
        assert out_img.shape == (64, 64, 3) and out_lab.shape == (64, 64)
        inside, outside = out_lab == 8, out_lab == 1
        if inside.sum() > 50 and outside.sum() > 50:
            # Geometric transforms kept the bright object under its label.
            assert out_img[inside].mean() > out_img[outside].mean() + 0.3


def test_hed_shift_changes_colour_not_shape():
    image = np.random.default_rng(0).uniform(0.3, 0.9, (16, 16, 3)).astype(np.float32)
    shifted = fixed_hed_shift(image, [0.3, -0.2, 0.0], [0.0, 0.0, 0.0])
    assert shifted.shape == image.shape and 0 <= shifted.min() and shifted.max() <= 1
    assert np.abs(shifted - image).mean() > 0.01


def test_patch_dataset_yields_normalised_crops_with_ignore(touching_squares):
    image = np.random.default_rng(0).uniform(size=(64, 64, 3)).astype(np.float32)
    ds = PatchDataset([Sample("a", image, touching_squares)], 96, (0.5,) * 3, (0.25,) * 3, augment=False)
    x, y = next(iter(ds))
    assert x.shape == (3, 96, 96) and x.dtype == torch.float32 and y.dtype == torch.int64
    # The 64 px image is padded to 96: padding is ignored (-1), the rest has real classes.
    assert (y == -1).any() and set(torch.unique(y).tolist()) <= {-1, 0, 1, 2}


def test_elastic_displacement_is_torchvisions_field():
    """augment.ElasticTransform smooths with scipy: the same displacement as torchvision's."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    from glas_seg.backend.augment import ElasticTransform

    image = tv_tensors.Image(torch.rand(3, 120, 90))
    fields = []
    for transform in (v2.ElasticTransform(alpha=30.0, sigma=6.0), ElasticTransform(alpha=30.0, sigma=6.0)):
        torch.manual_seed(3)
        fields.append(transform.make_params([image])["displacement"])
    assert fields[1].shape == (1, 120, 90, 2) and fields[1].abs().max() > 1e-3
    torch.testing.assert_close(fields[1], fields[0], atol=1e-6, rtol=0)


def test_loader_workers_draw_their_own_crops_reproducibly(touching_squares):
    image = np.random.default_rng(0).uniform(size=(64, 64, 3)).astype(np.float32)
    ds = PatchDataset([Sample("a", image, touching_squares)], 32, (0.5,) * 3, (0.25,) * 3, seed=5)

    def first_batches():
        loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
        batches = iter(loader)
        return [next(batches)[0] for _ in range(2)]  # one from each worker

    a, b = first_batches(), first_batches()
    assert not torch.equal(a[0], a[1])  # the two workers do not repeat each other
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # and the same seed gives the same stream


def test_patient_of_reads_tcga_barcodes():
    from glas_seg.backend.data import patient_of

    assert patient_of("TCGA-21-5784-01Z-00-DX1") == "TCGA-21-5784"
    assert patient_of("tcga-AB-1234-01") == "tcga-AB-1234"
    assert patient_of("slide_7") == "slide_7"


def test_dataset_split_of_a_pairs_folder_groups_tcga_patients(tmp_path):
    from glas_seg.backend.data import dataset_split

    img = np.zeros((8, 8, 3), np.uint8)
    lab = np.zeros((8, 8), np.uint8)
    names = [f"TCGA-AA-{p:04d}-01Z-00-DX{k}" for p in range(5) for k in (1, 2)]
    for name in names:
        skio.imsave(tmp_path / f"{name}.png", img, check_contrast=False)
        skio.imsave(tmp_path / f"{name}_label.png", lab, check_contrast=False)
    train, val = dataset_split(tmp_path, val_fraction=0.3, seed=1)
    assert len(train) + len(val) == 10 and len(val) >= 3
    patients = lambda pairs: {p[0][:12] for p in pairs}  # noqa: E731
    assert patients(train).isdisjoint(patients(val))
    with pytest.raises(ValueError, match="at least 2"):
        dataset_split(_empty(tmp_path))


def _empty(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


def test_monuseg_split_is_patient_wise(shared_data):
    from glas_seg.backend.data import dataset_split

    train, val = dataset_split(shared_data / "monuseg")
    assert len(train) + len(val) == 30 and 5 <= len(val) <= 8
    assert {p[0][:12] for p in train}.isdisjoint({p[0][:12] for p in val})


def test_binary_mask_samples_read_tnbc_as_connected_components(shared_data):
    from glas_seg.backend.data import binary_mask_samples

    samples = binary_mask_samples(shared_data / "tnbc")
    assert len(samples) == 50
    first = samples[0]
    assert first.image.shape == (512, 512, 3) and first.labels.shape == (512, 512)
    assert first.labels.max() > 10
    assert np.array_equal(np.unique(first.labels), np.arange(first.labels.max() + 1))


def test_binary_mask_samples_pairs_sibling_folders(tmp_path):
    from glas_seg.backend.data import binary_mask_samples

    (tmp_path / "Slide_01").mkdir()
    (tmp_path / "GT_01").mkdir()
    mask = np.zeros((16, 16), np.uint8)
    mask[2:5, 2:5] = 255
    mask[10:14, 9:15] = 255
    skio.imsave(tmp_path / "Slide_01" / "01_1.png", np.zeros((16, 16, 3), np.uint8), check_contrast=False)
    skio.imsave(tmp_path / "GT_01" / "01_1.png", mask, check_contrast=False)
    (sample,) = binary_mask_samples(tmp_path)
    assert sample.name == "01/01_1" and sample.labels.max() == 2
    with pytest.raises(ValueError, match="pairs"):
        binary_mask_samples(tmp_path / "GT_01")


def test_glass_edges_are_flat_bright_background(touching_squares):
    from glas_seg.backend.augment import glass_edge

    image = np.random.default_rng(0).uniform(0.2, 0.6, (64, 64, 3)).astype(np.float32)
    seen_glass = 0
    for seed in range(8):
        out, glass = glass_edge(image, np.random.default_rng(seed))
        assert out.shape == image.shape and glass.shape == image.shape[:2]
        if glass.any():
            seen_glass += 1
            assert out[glass].min() > 0.8 and np.array_equal(out[~glass], image[~glass])
    assert seen_glass >= 6
    ds = PatchDataset([Sample("a", image, touching_squares)], 64, (0.5,) * 3, (0.25,) * 3, augment=False,
                      glass=1.0, contour_mode="inner")
    for _, (x, y) in zip(range(4), ds):
        glassy = (x * 0.25 + 0.5).min(0).values > 0.8  # pixels the glass replaced
        assert glassy.any() and (y[glassy] == 0).all()


def test_filled_glass_edges_show_mirrored_tissue_and_are_not_scored(touching_squares):
    """glass_fill: the glass of a glass-edge crop is filled as segment(mask_glass=True) fills it
    (mirrored tissue), and those pixels are ignored (-1) in the target; the tissue is scored as before."""
    image = np.random.default_rng(0).uniform(0.2, 0.6, (64, 64, 3)).astype(np.float32)
    ds = PatchDataset([Sample("a", image, touching_squares)], 64, (0.5,) * 3, (0.25,) * 3, augment=False,
                      glass=1.0, glass_fill=1.0, contour_mode="inner")
    for _, (x, y) in zip(range(6), ds):
        rgb = x * 0.25 + 0.5
        assert rgb.max() < 0.61  # no flat glass left: every pixel shows (mirrored) tissue
        ignored = y == -1
        assert ignored.any() and not ignored.all()
        assert set(torch.unique(y[~ignored]).tolist()) <= {0, 1, 2}
    with pytest.raises(GlasSegError, match="glass fill share"):
        TrainSettings(glass_fill=1.5)
