import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["COLUMNS"] = "220"  # rich tables unwrapped in CliRunner output
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    """CUDA tests skip without a device; ``slow`` tests (real models, full sweeps) run only with ``-m slow``."""
    expr = config.getoption("markexpr") or ""
    run_slow = "slow" in expr and "not slow" not in expr
    no_cuda = pytest.mark.skip(reason="needs a CUDA device")
    not_now = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_cuda)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(not_now)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Mixtral saved as a normal HF directory with its own small byte-level BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

    from moeq.data.corpus import wiki_split

    d = tmp_path_factory.mktemp("tiny-mixtral")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(wiki_split("calib")[:300], trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=256)
    MixtralForCausalLM(cfg).save_pretrained(d)
    return d
