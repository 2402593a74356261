import numpy as np
import pytest

from jaxlab.deepconf import answers, arithmetic


def test_problems_are_deterministic_and_their_solutions_are_right():
    a = arithmetic.make_problems(20, 3, seed=1)
    assert a == arithmetic.make_problems(20, 3, seed=1)
    for p in a:
        numbers = [int(x) for x in p.prompt[3:-3].split("+")]
        assert len(numbers) == 3 and all(10 <= x < 100 for x in numbers)
        assert int(p.answer) == sum(numbers)
        assert answers.boxed_answer(p.solution) == p.answer
        for step in p.solution.strip().removesuffix(f". \\boxed{{{p.answer}}}").split(", "):
            left, right = step.split("=")
            assert sum(int(x) for x in left.split("+")) == int(right)


def test_training_rows_mask_the_solution_and_eos():
    from jaxlab.deepconf import arithmetic_model
    from jaxlab.rl import sft

    p = arithmetic.make_problems(1, 2, seed=0)[0]
    row = sft.sft_batch(*([part] for part in arithmetic_model.example(p)), 48)
    tokens, mask, loss_mask = row["tokens"], row["mask"], row["loss_mask"]
    prompt, solution = arithmetic.encode(p.prompt), arithmetic.encode(p.solution)
    end = len(prompt) + len(solution)
    assert tokens[0, end] == arithmetic.VOCAB.index(arithmetic.EOS)
    assert loss_mask[0, :len(prompt)].sum() == 0 and loss_mask[0, len(prompt):end + 1].all()
    assert not loss_mask[0, end + 1:].any() and not tokens[0, end + 1:].any()
    assert mask[0, :end + 1].all() and not mask[0, end + 1:].any()
    assert arithmetic.decode(tokens[0]) == p.prompt + p.solution
    with pytest.raises(ValueError, match="tokens > length 10"):
        sft.sft_batch(*([part] for part in arithmetic_model.example(p)), 10)
    with pytest.raises(ValueError, match="not in the task's vocabulary"):
        arithmetic.encode("Q: 1*2")


def test_saved_tokenizer_matches_the_task_encoding(tmp_path):
    from transformers import AutoTokenizer

    arithmetic.save_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    text = arithmetic.make_problems(1, 4, seed=3)[0]
    text = text.prompt + text.solution
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == arithmetic.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id == arithmetic.VOCAB.index(arithmetic.EOS)
    assert np.array_equal(tokenizer.convert_ids_to_tokens([0, 1]), [arithmetic.PAD,
                                                                    arithmetic.EOS])
