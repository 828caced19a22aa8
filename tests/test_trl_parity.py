"""Same math as TRL: llamaforge's preference losses equal TRL's on the same weights and batch.

Each test saves tiny llamaforge weights as a Hugging Face folder, loads them in transformers
(fp32), builds TRL's batch with TRL's own collator from the very token ids and loss mask that
llamaforge's `collate_pairs` batch carries (prompt masked; answer tokens, the template's
end-of-turn token included, in the loss; the template's trailing newline after it has no
label), and compares the loss of TRL's trainer with llamaforge's mean per pair (<= 1e-5).

TRL internals relied on (trl 1.16.0):
- `RewardTrainer.compute_loss(model, batch)` on `DataCollatorForPreference` output (chosen rows
  first, then rejected; optional per-pair `margin`); it sets `config.pad_token_id` so
  `LlamaForSequenceClassification` scores the last non-pad token.
- `DPOTrainer.compute_loss(model, batch)` on `trainer.data_collator` output from
  `{prompt_ids, chosen_ids, rejected_ids}`; the loss mask is `completion_mask`, i.e. every
  completion token, so TRL's completion is our answer up to its last labelled token.
- `CPOTrainer.compute_loss` / `ORPOTrainer.get_batch_loss_metrics` on `DPODataCollatorWithPadding`
  output from `{chosen,rejected}_{input_ids,attention_mask,labels}` (what their `tokenize_row`
  produces: labels -100 on the prompt).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from llamaforge.data.pipeline import build_dataset
from llamaforge.data.tokenizer import load_tokenizer
from llamaforge.io.hf import add_score_head, save_hf
from llamaforge.losses import IGNORE_INDEX, dpo_loss_fn, reward_loss_fn, sequence_logps
from llamaforge.train.batches import collate_pairs, collate_shared_pairs
from tests.helpers import random_model

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

FIX = Path(__file__).parent / "fixtures" / "data"
TOL = 1e-5
N_PAIRS = 4


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def hf_tok():
    """The tiny fixture tokenizer as transformers sees it; pad `</s>` never occurs in the data."""
    return transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(FIX / "tiny_tokenizer" / "tokenizer.json"),
        eos_token="<|im_end|>",
        pad_token="</s>",
    )


@pytest.fixture(scope="module")
def pairs():
    """Tokenized pairs of the preference fixture (chatml), of unequal lengths."""
    tok = load_tokenizer(FIX / "tiny_tokenizer")
    spec = {
        "path": str(FIX / "preference.jsonl"),
        "format": "preference",
        "template": "chatml",
        "val_size": 2,
    }
    return build_dataset(spec, tok, use_cache=False).train[:N_PAIRS]


def _args(cls, tmp_path, **kw):
    # TRL's configs default to bf16=True (mixed precision: the prepared reference model would
    # run under bf16 autocast, ~1e-2 off); the comparison is in fp32.
    return cls(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, **kw)


def _hf(model, d: Path, auto):
    save_hf(model, d)
    return auto.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()


def _answer(ids: list[int], labels: list[int]) -> list[int]:
    """The answer up to its last labelled token; the unlabelled tail (template newline) is cut.

    Causal attention makes the cut invisible to the earlier positions, so both sides score
    the same tokens under the same mask.
    """
    n = max(i for i, x in enumerate(labels) if x != IGNORE_INDEX) + 1
    assert labels[:n] == ids[:n], "labels must be the ids on the answer (prompt masked)"
    return ids[:n]


def _same_tokens(ours: dict, input_ids, loss_mask) -> None:
    """TRL's batch holds our tokens and our loss mask (after the shift) on its width."""
    w = input_ids.shape[1]
    real = loss_mask.bool()
    assert torch.equal(input_ids[real], ours["input_ids"][:, :w][real])
    assert torch.equal(real[:, 1:], ours["labels"][:, 1:w] != IGNORE_INDEX)
    assert (ours["labels"][:, w:] == IGNORE_INDEX).all()


def _cpo_features(examples) -> list[dict[str, list[int]]]:
    """Rows as TRL's CPO/ORPO `tokenize_row` writes them: prompt + answer, prompt masked."""
    out = []
    for ex in examples:
        row = {}
        for side in ("chosen", "rejected"):
            ans = _answer(ex[f"{side}_ids"], ex[f"{side}_labels"])
            p = ex["prompt_ids"]
            row[f"{side}_input_ids"] = p + ans
            row[f"{side}_attention_mask"] = [1] * (len(p) + len(ans))
            row[f"{side}_labels"] = [IGNORE_INDEX] * len(p) + ans
        out.append(row)
    return out


def _text_dataset():
    """A one-row text dataset: the trainers need one to construct, the batches are ours."""
    return datasets.Dataset.from_dict(
        {"prompt": ["Hi?"], "chosen": [" Yes."], "rejected": [" No."]}
    )


def _ours_mean(fn, model, batch) -> float:
    with torch.no_grad():
        total, n, _ = fn(model, batch)
    return float(total) / int(n)


# ---------------------------------------------------------------- reward model


@pytest.fixture(scope="module")
def reward_models(tmp_path_factory):
    ours = add_score_head(random_model("tiny-llama3", seed=4)).eval()
    d = tmp_path_factory.mktemp("rm")
    return ours, _hf(ours, d, transformers.AutoModelForSequenceClassification)


@pytest.mark.parametrize(("margin", "center"), [(0.0, None), (0.0, 0.1), (0.5, None), (0.5, 0.1)])
def test_reward_loss_equals_trl_reward_trainer(
    tmp_path, pairs, hf_tok, reward_models, margin, center
):
    from trl import RewardConfig, RewardTrainer

    ours_model, hf_model = reward_models
    feats = [
        {
            "chosen_ids": ex["prompt_ids"] + ex["chosen_ids"],
            "rejected_ids": ex["prompt_ids"] + ex["rejected_ids"],
            **({"margin": margin} if margin else {}),
        }
        for ex in pairs
    ]
    ds = datasets.Dataset.from_list(feats)
    args = _args(RewardConfig, tmp_path, center_rewards_coefficient=center)
    trainer = RewardTrainer(model=hf_model, args=args, train_dataset=ds, processing_class=hf_tok)
    theirs_batch = trainer.data_collator(feats)
    ours_batch = collate_pairs(pairs, pad_id=hf_tok.pad_token_id)
    assert torch.equal(theirs_batch["input_ids"], ours_batch["input_ids"])  # same rows, same pad
    with torch.no_grad():
        theirs = float(trainer.compute_loss(trainer.model, theirs_batch))
    fn = reward_loss_fn(margin=margin, center_coef=center or 0.0)
    ours = _ours_mean(fn, ours_model, ours_batch)
    assert abs(ours - theirs) <= TOL, (ours, theirs)
    shared = collate_shared_pairs(pairs, pad_id=hf_tok.pad_token_id)  # the default layout
    ours = _ours_mean(fn, ours_model, shared)
    assert abs(ours - theirs) <= TOL, ("shared prompt", ours, theirs)


# ---------------------------------------------------------------- DPO family


@pytest.fixture(scope="module")
def policy_and_reference(tmp_path_factory):
    """Reference = random tiny weights; policy = a perturbed copy (so DPO is not ln 2)."""
    reference = random_model("tiny-llama3", seed=1)
    policy = copy.deepcopy(reference)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.03 * torch.randn(p.shape, generator=g))
    auto = transformers.AutoModelForCausalLM
    hf_policy = _hf(policy, tmp_path_factory.mktemp("policy"), auto)
    hf_reference = _hf(reference, tmp_path_factory.mktemp("reference"), auto)
    return policy.eval(), reference.eval(), hf_policy, hf_reference


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_losses_equal_trl_dpo_trainer(
    tmp_path, pairs, hf_tok, policy_and_reference, loss_type, beta
):
    from trl import DPOConfig, DPOTrainer

    policy, reference, hf_policy, hf_reference = policy_and_reference
    args = _args(DPOConfig, tmp_path, beta=beta, loss_type=[loss_type])
    trainer = DPOTrainer(
        model=copy.deepcopy(hf_policy),  # the trainer patches the model's forward
        ref_model=copy.deepcopy(hf_reference),
        args=args,
        train_dataset=_text_dataset(),
        processing_class=hf_tok,
    )
    feats = [
        {
            "prompt_ids": ex["prompt_ids"],
            "chosen_ids": _answer(ex["chosen_ids"], ex["chosen_labels"]),
            "rejected_ids": _answer(ex["rejected_ids"], ex["rejected_labels"]),
        }
        for ex in pairs
    ]
    theirs_batch = trainer.data_collator(feats)
    ours_batch = collate_pairs(pairs, pad_id=hf_tok.pad_token_id)
    _same_tokens(ours_batch, theirs_batch["input_ids"], theirs_batch["completion_mask"])
    with torch.no_grad():
        theirs = float(trainer.compute_loss(trainer.model, theirs_batch))

    def ref_logps(model, batch):
        return sequence_logps(reference, batch)[0].chunk(2)

    ours = _ours_mean(dpo_loss_fn(loss_type, beta=beta, reference=ref_logps), policy, ours_batch)
    assert abs(ours - theirs) <= TOL, (ours, theirs)
    shared = collate_shared_pairs(pairs, pad_id=hf_tok.pad_token_id)  # the default layout
    ours = _ours_mean(dpo_loss_fn(loss_type, beta=beta, reference=ref_logps), policy, shared)
    assert abs(ours - theirs) <= TOL, ("shared prompt", ours, theirs)
    if loss_type == "sigmoid":  # the reference differs from the policy: not the step-0 ln 2
        assert abs(theirs - math.log(2)) > 1e-3


@pytest.mark.parametrize(("beta", "gamma"), [(2.0, 0.5), (0.5, 1.2)])
def test_simpo_equals_trl_cpo_trainer_simpo(
    tmp_path, pairs, hf_tok, policy_and_reference, beta, gamma
):
    # TRL's SimPO: logits = avg_c - avg_r - simpo_gamma / beta, loss = -log σ(beta * logits),
    # i.e. -log σ(beta (avg_c - avg_r) - simpo_gamma): simpo_gamma is our gamma (not gamma/beta).
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    policy, _, hf_policy, _ = policy_and_reference
    args = _args(
        CPOConfig,
        tmp_path,
        loss_type="simpo",
        cpo_alpha=0.0,
        beta=beta,
        simpo_gamma=gamma,
        max_length=256,
    )
    trainer = CPOTrainer(
        model=copy.deepcopy(hf_policy),
        args=args,
        train_dataset=_text_dataset(),
        processing_class=hf_tok,
    )
    theirs_batch = trainer.data_collator(_cpo_features(pairs))
    ours_batch = collate_pairs(pairs, pad_id=hf_tok.pad_token_id)
    for side, rows in (("chosen", slice(0, N_PAIRS)), ("rejected", slice(N_PAIRS, None))):
        _same_tokens(
            {k: ours_batch[k][rows] for k in ("input_ids", "labels")},
            theirs_batch[f"{side}_input_ids"],
            theirs_batch[f"{side}_labels"] != IGNORE_INDEX,
        )
    with torch.no_grad():
        theirs = float(trainer.compute_loss(trainer.model, theirs_batch))
    ours = _ours_mean(dpo_loss_fn("simpo", beta=beta, gamma=gamma), policy, ours_batch)
    assert abs(ours - theirs) <= TOL, (ours, theirs)


def _orpo_trainer(tmp_path, hf_tok, hf_policy, beta):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    args = _args(ORPOConfig, tmp_path, beta=beta, max_length=256)
    return ORPOTrainer(
        model=copy.deepcopy(hf_policy),
        args=args,
        train_dataset=_text_dataset(),
        processing_class=hf_tok,
    )


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_equals_trl_orpo_trainer_on_one_pair(
    tmp_path, pairs, hf_tok, policy_and_reference, beta
):
    """One pair whose prompt is a single token and whose answers end at the end-of-turn token.

    TRL's ORPO NLL is the mean over *every attended token* of the chosen rows of the batch
    (prompt included, `concatenated_forward`: labels = input_ids where attention_mask == 1),
    whereas ours is the mean over each pair's answer tokens, then averaged over pairs. The two
    agree when the chosen row has no prompt token to predict (one-token prompt), no unlabelled
    tail, and the batch holds one pair; the odds-ratio term is compared on a full batch below.
    """
    policy, _, hf_policy, _ = policy_and_reference
    ex = pairs[0]
    one = {"prompt_ids": ex["prompt_ids"][:1]}
    for side in ("chosen", "rejected"):
        ans = _answer(ex[f"{side}_ids"], ex[f"{side}_labels"])
        one[f"{side}_ids"] = one[f"{side}_labels"] = ans
    trainer = _orpo_trainer(tmp_path, hf_tok, hf_policy, beta)
    theirs_batch = trainer.data_collator(_cpo_features([one]))
    with torch.no_grad():
        theirs = float(trainer.compute_loss(trainer.model, theirs_batch))
    ours_batch = collate_pairs([one], pad_id=hf_tok.pad_token_id)
    ours = _ours_mean(dpo_loss_fn("orpo", beta=beta), policy, ours_batch)
    assert abs(ours - theirs) <= TOL, (ours, theirs)


def test_orpo_odds_ratio_term_equals_trl_on_a_batch(tmp_path, pairs, hf_tok, policy_and_reference):
    """On a batch of unequal pairs the odds-ratio term (loss minus the NLL term) agrees.

    The NLL terms differ by definition (see the one-pair test): TRL's is a token-weighted mean
    over prompt + answer (+ the template's trailing newline) of all chosen rows; ours is each
    chosen answer's mean NLL, averaged over pairs.
    """
    policy, _, hf_policy, _ = policy_and_reference
    beta = 0.5
    trainer = _orpo_trainer(tmp_path, hf_tok, hf_policy, beta)
    theirs_batch = trainer.data_collator(_cpo_features(pairs))
    with torch.no_grad():
        loss, metrics = trainer.get_batch_loss_metrics(trainer.model, theirs_batch)
    theirs = float(loss) - metrics["nll_loss"]  # = -beta * mean log σ(log odds)
    ours_batch = collate_pairs(pairs, pad_id=hf_tok.pad_token_id)
    ours = _ours_mean(dpo_loss_fn("orpo", beta=beta), policy, ours_batch) - _ours_mean(
        dpo_loss_fn("orpo", beta=0.0), policy, ours_batch
    )
    assert abs(ours - theirs) <= TOL, (ours, theirs)
