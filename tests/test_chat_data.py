"""Chat data: the three row shapes, the rows refused by name, and the loss on exactly the
assistant turns, checked token by token on the embedded model's real chat template and
on the labels TRL's SFTTrainer builds from them."""
import json

import pytest

from shomin.tasks.ground.errors import DataError
from shomin.tasks.ground.settings import DatasetSpec
from shomin.tasks.models import chat
from shomin.tasks.stages.dataset import DatasetStageSettings, prepare
from tests.conftest import ROOT

CONVERSATION = [
    {"role": "system", "content": "丁寧に短く答えてください。"},
    {"role": "user", "content": "How long should I boil an egg?"},
    {"role": "assistant", "content": "About 7 minutes for a firm yolk."},
    {"role": "user", "content": "半熟にするには？"},
    {"role": "assistant", "content": "6分ほどで火を止めて、冷水にとってください。"},
    {"role": "user", "content": "And for three eggs?"},
    {"role": "assistant", "content": "The same time: the eggs cook side by side."},
]


KEEP_REPEATS = DatasetStageSettings(drop_duplicates=False)


def write(tmp_path, rows, name="rows.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def smol_tokenizer():
    """The embedded SmolLM2-135M-Instruct's own tokenizer and chat template, read from its GGUF."""
    from transformers import AutoTokenizer

    from shomin.tasks.ground import hub
    folder, filename = hub.embedded_gguf("smollm2-135m-instruct")
    return AutoTokenizer.from_pretrained(folder, gguf_file=filename)


def trained_runs(ids, mask):
    """The contiguous stretches of trained tokens, as token id lists."""
    runs, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_exactly_the_assistant_turns_are_trained_on_the_real_template(smol_tokenizer):
    tok = smol_tokenizer
    ids, mask = chat.encode(tok, CONVERSATION, max_len=4096)
    assert ids == tok(chat.render(tok, CONVERSATION), add_special_tokens=False)["input_ids"]
    answers = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    runs = trained_runs(ids, mask)
    # one stretch per assistant turn, each exactly its text plus the end-of-turn token (so the model learns to stop)
    assert [tok.decode(r) for r in runs] == [f"{a}<|im_end|>\n" for a in answers]
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    assert all(end_of_turn in r for r in runs)
    # and everything else — system, user turns, role headers — is not trained
    untrained = tok.decode([i for i, m in zip(ids, mask) if not m])
    for m in CONVERSATION:
        if m["role"] != "assistant":
            assert m["content"] in untrained
    assert sum(mask) == sum(len(r) for r in runs) == sum(len(tok(f"{a}<|im_end|>\n", add_special_tokens=False)["input_ids"])
                                                        for a in answers)


def test_truncation_keeps_ids_and_mask_aligned(smol_tokenizer):
    ids, mask = chat.encode(smol_tokenizer, CONVERSATION, max_len=30)
    assert len(ids) == len(mask) == 30


def test_a_template_that_rewrites_earlier_turns_is_refused_by_row(smol_tokenizer):
    """A template that renders the last assistant turn differently from earlier ones (as reasoning
    models' templates do) would put the mask in the wrong place: refused, naming the message."""
    import copy
    tok = copy.copy(smol_tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if loop.last and m['role'] == 'assistant' %}<final>{% endif %}"
                         "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(DataError, match="train row 3: message 3: the chat template renders earlier turns differently"):
        chat.encode(tok, CONVERSATION[:4] + CONVERSATION[4:5], 512, "train row 3: ")


def test_the_three_shapes_read_as_the_same_conversation(tmp_path):
    pair = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    shapes = {
        "messages": [{"messages": pair}] * 2,
        "sharegpt": [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}] * 2,
        "instruction": [{"instruction": "Hi", "input": "", "output": "Hello!"}] * 2,
    }
    for name, rows in shapes.items():
        train, evals = prepare(DatasetSpec(source=write(tmp_path, rows, f"{name}.jsonl"), format="chat"), seed=0,
                               settings=KEEP_REPEATS)
        assert evals[0]["messages"] == pair, name
    # a pipeline-wide system prompt goes first where a row has none; a ShareGPT row's own wins
    rows = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}], "system": "Own."},
            {"conversations": [{"from": "human", "value": "Yo"}, {"from": "gpt", "value": "Hey"}]}]
    train, evals = prepare(DatasetSpec(source=write(tmp_path, rows), format="chat", system="Be brief."), seed=0,
                           settings=None)
    firsts = sorted(r["messages"][0]["content"] for r in train + evals)
    assert firsts == ["Be brief.", "Own."]
    # instruction rows with an input: instruction and input in one user turn
    rows = [{"instruction": "Translate", "input": "ねこ", "output": "cat"}] * 2
    _, evals = prepare(DatasetSpec(source=write(tmp_path, rows), format="chat"), seed=0, settings=KEEP_REPEATS)
    assert evals[0]["messages"][0] == {"role": "user", "content": "Translate\n\nねこ"}


@pytest.mark.parametrize("rows, message", [
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}],
     "row 1: message 2: unknown role 'bot'"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
      {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]}],
     "row 2: message 2: empty content"),
    ([{"conversations": [{"from": "human", "value": "a"}]}], "row 1: no assistant turn"),
    ([{"conversations": [{"from": "gpt", "value": "hello"}, {"from": "human", "value": "a"}]}],
     "row 1: starts with an assistant turn"),
    ([{"messages": "user: hi"}], "row 1: `messages` is not a list of role/content objects"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "id": 3}],
     "unexpected column 'id'"),
    ([{"text": "hello"}], "format chat needs a `messages` column"),
])
def test_bad_rows_are_named(tmp_path, rows, message):
    path = write(tmp_path, rows)
    with pytest.raises(DataError) as e:
        prepare(DatasetSpec(source=path, format="chat"), seed=0, settings=None)
    assert str(e.value).startswith(path) and message in str(e.value) and "\n" not in str(e.value)


def test_settings_a_format_does_not_read_are_refused():
    with pytest.raises(ValueError, match="`system` is not used with format 'instruction'"):
        DatasetSpec(source="x.jsonl", system="hi")
    with pytest.raises(ValueError, match="`template` is not used with format 'chat'"):
        DatasetSpec(source="x.jsonl", format="chat", template={"prompt": "{instruction}"})


def test_the_shipped_sample_is_valid_multi_turn_chat():
    train, evals = prepare(DatasetSpec(source=str(ROOT / "data" / "chat-sample.jsonl"), format="chat"), seed=42,
                           settings=None)
    rows = train + evals
    assert len(rows) == 72
    assert sum(1 for r in rows if sum(m["role"] == "assistant" for m in r["messages"]) >= 2) >= 60


def test_trl_trains_on_the_assistant_masks(tiny_chat_model, tmp_path):
    """The labels SFTTrainer builds from the stage's rows are the ids on assistant tokens, -100 elsewhere."""
    from shomin.tasks.models.loading import load_tokenizer
    from shomin.tasks.stages.sft import chat_rows
    tok = load_tokenizer(tiny_chat_model)
    rows = chat_rows(tok, [{"messages": CONVERSATION}], max_len=512)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_chat_model),
                         args=SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none",
                                        max_length=512),
                         train_dataset=Dataset.from_list(rows), processing_class=tok)
    sample = trainer.train_dataset[0]
    ids, mask = chat.encode(tok, CONVERSATION, 512)
    assert sample["input_ids"] == ids
    assert sample["labels"] == [i if m else -100 for i, m in zip(ids, mask)]
    assert 0 < sum(mask) < len(mask)
