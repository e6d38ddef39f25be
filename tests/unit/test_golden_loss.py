"""The policy loss against the official ``compute_loss`` outputs (tests/golden/loss.json, 9 cases).

The official heads emit two-column logits; the project's policy emits their difference. The scores are built here
from leaf logits, so the gradients compared are d total / d logits, as stored.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cacovid_rl.config import LossConfig
from cacovid_rl.rl.loss import cacovid_loss, group_advantages
from cacovid_rl.types import MODE_CONTENT, MODE_FRAME, MODE_TOKEN, PolicyScores
from tests.golden_io import blob, load_golden

CASES = load_golden("loss")["cases"]
MODES = {"content": MODE_CONTENT, "token": MODE_TOKEN, "frame": MODE_FRAME}


def _scores(token_logits: torch.Tensor, frame_logits: torch.Tensor, t: int, n: int) -> PolicyScores:
    return PolicyScores(
        token=(token_logits[:, 1] - token_logits[:, 0]).reshape(t, n), frame=frame_logits[:, 1] - frame_logits[:, 0]
    )


def _logit_scores(case: dict, which: str) -> PolicyScores:
    token, frame = blob(case[f"{which}_token_logits"]), blob(case[f"{which}_frame_logits"])
    return _scores(torch.from_numpy(token), torch.from_numpy(frame), case["T"], case["N"])


def _memory(case: dict) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep lists, modes, rewards and frame masks of the case's rollouts, in memory order."""
    t = case["T"]
    keep, modes, rewards, frames = [], [], [], []
    for r in case["rollouts"]:
        keep.append(torch.tensor(r["kept"], dtype=torch.long))
        modes.append(MODES[r["mode"]])
        rewards.append(r["reward"])
        mask = torch.zeros(t, dtype=torch.bool)
        drawn = r.get("drawn_frames") if r["mode"] == "frame" else None
        if drawn is not None:
            mask[torch.tensor(drawn, dtype=torch.long)] = True
        else:
            mask[torch.tensor(r["kept"], dtype=torch.long) // case["N"]] = True
        frames.append(mask)
    return keep, torch.tensor(modes), torch.tensor(rewards, dtype=torch.float32), torch.stack(frames)


def _close(got: np.ndarray, expected: np.ndarray) -> bool:
    """The golden gradient tolerance: abs 1e-6 or rel 1e-4, per entry."""
    return bool(np.all((np.abs(got - expected) <= 1e-6) | (np.abs(got - expected) <= 1e-4 * np.abs(expected))))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["id"])
def test_loss_matches_the_official(case: dict) -> None:
    t, n = case["T"], case["N"]
    cfg = LossConfig(
        clip_low=case["clip_low"], clip_high=case["clip_high"], kl_coef=case["kl_coef"], adv_eps=case["adv_eps"]
    )
    old = _scores(
        torch.from_numpy(blob(case["old_token_logits"])), torch.from_numpy(blob(case["old_frame_logits"])), t, n
    )
    new_tok = torch.from_numpy(blob(case["new_token_logits"])).requires_grad_(True)
    new_frm = torch.from_numpy(blob(case["new_frame_logits"])).requires_grad_(True)
    keep, modes, rewards, frame_masks = _memory(case)

    out = cacovid_loss(_scores(new_tok, new_frm, t, n), old, keep, modes, rewards, cfg, frame_masks=frame_masks)
    out.total.backward()

    token_kl, frame_kl = out.metrics["loss/token_kl"], out.metrics["loss/frame_kl"]
    assert float(out.total.detach()) == pytest.approx(case["official_total_loss"], abs=1e-5)
    assert float(out.token.detach()) + cfg.kl_coef * token_kl == pytest.approx(case["official_token_loss"], abs=1e-5)
    assert float(out.frame.detach()) + cfg.kl_coef * frame_kl == pytest.approx(case["official_frame_loss"], abs=1e-5)
    if "official_token_kl" in case:
        assert token_kl == pytest.approx(case["official_token_kl"], abs=1e-5)
        assert frame_kl == pytest.approx(case["official_frame_kl"], abs=1e-5)
    np.testing.assert_allclose(
        group_advantages(rewards[modes == MODE_TOKEN]).numpy(), blob(case["official_token_advantages"]), atol=1e-5
    )
    np.testing.assert_allclose(
        group_advantages(rewards[modes == MODE_FRAME]).numpy(), blob(case["official_frame_advantages"]), atol=1e-5
    )
    assert _close(new_tok.grad.numpy(), blob(case["official_grad_token_logits"]))
    assert _close(new_frm.grad.numpy(), blob(case["official_grad_frame_logits"]))


def test_frame_loss_uses_the_drawn_frames_not_the_kept_tokens() -> None:
    """A drawn frame that DPC-KNN left without tokens still counts as kept (golden README, dpc.json quirk)."""
    case = next(c for c in CASES if c["iterations"] > 1)
    t, n = case["T"], case["N"]
    old = _scores(
        torch.from_numpy(blob(case["old_token_logits"])), torch.from_numpy(blob(case["old_frame_logits"])), t, n
    )
    new = _scores(
        torch.from_numpy(blob(case["new_token_logits"])), torch.from_numpy(blob(case["new_frame_logits"])), t, n
    )
    keep, modes, rewards, frame_masks = _memory(case)
    drawn = cacovid_loss(new, old, keep, modes, rewards, LossConfig(), frame_masks=frame_masks)
    frm = (modes == MODE_FRAME).nonzero().squeeze(1)
    emptied = frame_masks.clone()
    emptied[frm] = False
    emptied[frm, 0] = True  # every frame sample now "drew" frame 0 only
    other = cacovid_loss(new, old, keep, modes, rewards, LossConfig(), frame_masks=emptied)
    assert float(other.frame) != pytest.approx(float(drawn.frame), abs=1e-7)
    assert float(other.token) == float(drawn.token)  # token-mode rows never read the frame masks
    with pytest.raises(ValueError, match="frame_masks"):
        cacovid_loss(new, old, keep, modes, rewards, LossConfig(), frame_masks=frame_masks[:, :1])
