"""Where does the logit-KD term pull a student, compared with nnU-Net's seg loss? A diagnostic for row c_logitkd.

Loads a model folder's fold checkpoint (e.g. a c_logitkd run of protocol.py, any epoch's checkpoint_latest.pth)
into its own trainer (the trainer class and settings it was trained with), draws training batches through nnU-Net's
own augmenting data loader, and for each batch reports, at the full-resolution output:
  - the share of the logit term (its per-voxel KL, LogitKDLoss.per_voxel) and of the
    voxel count that falls on voxels of each label (0 background, 1 anterior, 2 posterior);
  - d(seg)/dz_c and d(logit)/dz_c summed over the voxels labelled c, for the logit z_c of their own class c
    (negative: the term raises the class's own logit there), over every deep-supervision output's own gradient;
  - ||d(seg)/dtheta||, ||d(logit)/dtheta|| and their cosine over the student's parameters;
  - the student's and the teacher's confusion on the batch (row: label, column: predicted class), and the share of
    the posterior voxels (label 2) each gets right at every deep-supervision output against its downsampled labels;
  - the separation of the two structures at full resolution, D = mean(z_2 - z_1) over the voxels labelled 2 minus
    the same over the voxels labelled 1, and its first-order change under a gradient step of each term alone,
    -dD/dtheta . d(term)/dtheta (positive: the step separates them further), and that of the full-resolution logit
    term restricted to the voxels of each label (background, 1, 2);
  - the teacher's and the student's softened probabilities softmax(z / T) at the trainer's temperature T, averaged
    over the voxels of each label (row: label, column: class): the target the logit term asks for, and where the
    student is.
Run it with the same environment the training had (nnUNet_preprocessed, nnUNet_results of the model,
RECOKD_CONFIG of its settings file) and nnUNet_n_proc_DA=0:

  nnUNet_n_proc_DA=0 nnUNet_preprocessed=$WORK/preprocessed nnUNet_results=$WORK/results_c_logitkd/s1 \\
  RECOKD_CONFIG=$WORK/config_c_logitkd_s1.json python examples/hippocampus/logit_terms_check.py 204 \\
      nnUNetTrainerLogitKD checkpoint_latest.pth --batches 4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
import torch.nn.functional as F


def per_class_shares(per_voxel: torch.Tensor, target: torch.Tensor, n_classes: int) -> list[float]:
    """Fraction of sum(per_voxel) that lies on voxels of each label. per_voxel, target: (B, 1, *spatial)."""
    total = per_voxel.sum().clamp_min(1e-12)
    return [float(per_voxel[target == c].sum() / total) for c in range(n_classes)]


def own_logit_gradient(grad: torch.Tensor, target: torch.Tensor, n_classes: int) -> list[float]:
    """sum over voxels labelled c of d(loss)/dz_c (the gradient on their own class's logit), per class c.
    grad: (B, C, *spatial), target: (B, 1, *spatial)."""
    return [float(grad[:, c:c + 1][target == c].sum()) for c in range(n_classes)]


def confusion(prediction: torch.Tensor, target: torch.Tensor, n_classes: int) -> list[list[float]]:
    """Row c: the fraction of the voxels labelled c that are predicted as each class (rows of labels absent: 0).
    prediction, target: (B, 1, *spatial) integer labels."""
    rows = []
    for c in range(n_classes):
        mine = prediction[target == c]
        rows.append([float((mine == k).float().mean()) if mine.numel() else 0.0 for k in range(n_classes)])
    return rows


def mean_probabilities(logits: torch.Tensor, target: torch.Tensor, n_classes: int,
                       temperature: float) -> list[list[float]]:
    """Row c: softmax(logits / temperature) averaged over the voxels labelled c (rows of labels absent: 0).
    logits: (B, C, *spatial), target: (B, 1, *spatial) integer labels."""
    probs = torch.softmax(logits.detach().float() / temperature, 1)
    mask = [(target == c)[:, 0] for c in range(n_classes)]
    return [[float(probs[:, k][m].mean()) if m.any() else 0.0 for k in range(probs.shape[1])] for m in mask]


def separation(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """D = mean(z_2 - z_1) over the voxels labelled 2 - mean(z_2 - z_1) over the voxels labelled 1 (0-d, with the
    logits' graph; 0 where a label is absent). logits: (B, C >= 3, *spatial), target: (B, 1, *spatial)."""
    margin = (logits[:, 2] - logits[:, 1]).float()
    parts = [margin[target[:, 0] == c].mean() if (target == c).any() else margin.sum() * 0 for c in (2, 1)]
    return parts[0] - parts[1]


def posterior_right_per_level(outputs, targets, n_classes: int) -> list:
    """The share of the voxels labelled 2 predicted 2 at every deep-supervision output (full resolution first),
    against that output's own downsampled labels; None per level without a class 2."""
    return [confusion(z.argmax(1, keepdim=True), t.long(), n_classes)[2][2] if n_classes > 2 else None
            for z, t in zip(outputs, targets)]


def load_trainer(dataset: str, trainer_name: str, fold: str, checkpoint: str, seed: int):
    """The model folder's trainer (on the CPU, THREADS torch threads, default 2), initialized, with the fold
    folder's `checkpoint` file loaded, and numpy's and torch's RNGs seeded with `seed` (the batches drawn next).
    Returns (trainer, the checkpoint's path)."""
    from nnunetv2.run.run_training import get_trainer_from_args

    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    trainer = get_trainer_from_args(dataset, "3d_fullres", fold if fold == "all" else int(fold), trainer_name,
                                    "nnUNetPlans", device=torch.device("cpu"))
    trainer.initialize()
    path = os.path.join(trainer.output_folder, checkpoint)
    trainer.load_checkpoint(path)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return trainer, path


def gradients(value: torch.Tensor, inputs: list, retain_graph: bool = True) -> list[torch.Tensor]:
    """d value / d input for each input, zeros for inputs value does not depend on (e.g. the heads of the
    deep-supervision outputs of weight 0)."""
    grads = torch.autograd.grad(value, inputs, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset")
    parser.add_argument("trainer")
    parser.add_argument("checkpoint", help="file name inside the fold folder, e.g. checkpoint_latest.pth")
    parser.add_argument("--fold", default="0")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="seed of the batches drawn")
    parser.add_argument("--json")
    args = parser.parse_args()
    trainer, checkpoint = load_trainer(args.dataset, args.trainer, args.fold, args.checkpoint, args.seed)
    epoch = trainer.current_epoch
    loader, _ = trainer.get_dataloaders()
    network = trainer.network
    network.train()
    params = [p for p in network.parameters() if p.requires_grad]
    progress = epoch / max(1, trainer.num_epochs)
    n_classes = trainer.label_manager.num_segmentation_heads
    temperature = trainer.distiller.logit.temperature
    rows = []
    for _ in range(args.batches):
        batch = next(loader)
        data, target = batch["data"], batch["target"]
        targets = target if isinstance(target, list) else [target]
        outputs = network(data)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        seg = trainer._seg_loss(outputs, target, batch.get("keys"))
        with torch.no_grad():  # the teacher's forward once, for the term and for its confusion below
            teacher_outputs = trainer.teachers[0].network(data)
        teacher_outputs = teacher_outputs if isinstance(teacher_outputs, (list, tuple)) else [teacher_outputs]
        kd, _ = trainer.distiller.logit_terms(outputs, [list(teacher_outputs)], targets, progress)
        inputs = params + list(outputs)  # an output of deep-supervision weight 0 is unused: its gradient is 0
        teacher_logits, y = teacher_outputs[0], targets[0].long()
        # the logit term's per-voxel value at full resolution (before T^2), with the student's graph
        kl = trainer.distiller.logit.per_voxel(outputs[0], [teacher_logits])
        split = separation(outputs[0], y) if n_classes > 2 else None
        grad_split = None if split is None else flat(gradients(split, params))
        grads_seg = gradients(seg, inputs)
        # the same first-order change from the full-resolution logit term restricted to the voxels of each label
        split_by_label = None if split is None else [
            float(-(grad_split @ flat(gradients((kl * (y == c)).sum() / kl.numel() * temperature ** 2, params))))
            for c in range(n_classes)]
        grads_kd = gradients(kd, inputs, retain_graph=False)
        g_seg, g_kd = flat(grads_seg[:len(params)]), flat(grads_kd[:len(params)])
        out_seg, out_kd = grads_seg[len(params):], grads_kd[len(params):]
        own_seg = np.sum([own_logit_gradient(g, tg.long(), n_classes) for g, tg in zip(out_seg, targets)], 0)
        own_kd = np.sum([own_logit_gradient(g, tg.long(), n_classes) for g, tg in zip(out_kd, targets)], 0)
        rows.append({
            "seg": float(seg), "logit_weighted": float(kd),
            "voxel_share": [float((y == c).float().mean()) for c in range(n_classes)],
            "logit_share_full_res": per_class_shares(kl.detach(), y, n_classes),
            "own_logit_grad_seg": own_seg.tolist(), "own_logit_grad_logit": own_kd.tolist(),
            "param_grad_norm_seg": float(g_seg.norm()), "param_grad_norm_logit": float(g_kd.norm()),
            "param_grad_cosine": float(F.cosine_similarity(g_seg, g_kd, 0)),
            "separation": None if split is None else float(split),
            "separation_change_seg": None if split is None else float(-(grad_split @ g_seg)),
            "separation_change_logit": None if split is None else float(-(grad_split @ g_kd)),
            "separation_change_full_res_logit_by_label": split_by_label,
            "student_confusion": confusion(outputs[0].argmax(1, keepdim=True), y, n_classes),
            "teacher_confusion": confusion(teacher_logits.argmax(1, keepdim=True), y, n_classes),
            # labelled 2 predicted 2, per deep-supervision output (full resolution first): the target of the
            # logit term at each level, against that level's downsampled labels
            "teacher_posterior_right_per_level": posterior_right_per_level(teacher_outputs, targets, n_classes),
            "student_posterior_right_per_level": posterior_right_per_level(outputs, targets, n_classes),
            # the logit term's target and the student's answer at full resolution, softened at the term's T
            "teacher_soft_probabilities": mean_probabilities(teacher_logits, y, n_classes, temperature),
            "student_soft_probabilities": mean_probabilities(outputs[0], y, n_classes, temperature),
        })
        print(json.dumps(rows[-1]))
    mean = {k: np.mean([r[k] for r in rows], 0).round(5).tolist() for k in rows[0] if rows[0][k] is not None}
    result = {"checkpoint": checkpoint, "epoch": epoch, "batches": args.batches, "seed": args.seed, "mean": mean,
              "per_batch": rows}
    print("mean over batches:", json.dumps(mean))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
