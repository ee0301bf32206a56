"""The demo models' tokenizer: byte-level BPE trained locally on a built-in corpus, Llama-style
special tokens (ids 0-3) and a small chat template. Deterministic for a seed."""

from __future__ import annotations

import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# Special-token order fixes their ids (0..3): BpeTrainer assigns ids in list order.
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD)
BOS_ID, EOS_ID, PAD_ID = 1, 2, 3

# Each turn ends with EOS so a generation stops where the assistant turn ends.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unsupported role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def train_tokenizer(vocab_size: int, model_max_length: int, seed: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the built-in corpus; the same seed gives the same tokenizer."""
    bpe = Tokenizer(models.BPE(unk_token=UNK))
    # No prefix space, so decode(encode(text)) returns the text unchanged.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(seed), trainer=trainer)
    if [bpe.token_to_id(token) for token in SPECIAL_TOKENS] != [0, BOS_ID, EOS_ID, PAD_ID]:
        raise RuntimeError("BpeTrainer did not put the special tokens first; config ids would be wrong")
    # Llama tokenizers prepend BOS on encode; mirror that so prompts look familiar.
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def _corpus(seed: int, sentences: int = 20000) -> list[str]:
    """English-ish sentences with numbers: enough variety for thousands of merges."""
    rng = random.Random(seed)
    words = _WORDS.split()
    lines = []
    for _ in range(sentences):
        sentence = rng.choices(words, k=rng.randint(4, 14))
        if rng.random() < 0.4:
            sentence.insert(rng.randrange(len(sentence)), str(rng.randint(0, 99999)))
        if rng.random() < 0.3:
            sentence[rng.randrange(len(sentence))] += ","
        lines.append(" ".join(sentence).capitalize() + rng.choice(".!?"))
    return lines


_WORDS = """
the be to of and a in that have it for not on with he as you do at this but his by from they we say her
she or an will my one all would there their what so up out if about who get which go me when make can
like time no just him know take people into year your good some could them see other than then now look
only come its over think also back after use two how our work first well way even new want because any
these give day most us is was are were been has had did said made went told found gave man woman child
world life hand part place case week company system program question government number night point home
water room mother area money story fact month lot right study book eye job word business issue side kind
head house service friend father power hour game line end member law car city community name president
team minute idea kid body information school face others level office door health person art war history
party result change morning reason research girl guy moment air teacher force education food light river
stone tree garden window paper music field small large long great little own old big high different local
early young important few public bad same able late hard major better economic strong possible whole free
military true federal international full special easy clear recent certain personal open red difficult
available likely short single medical current wrong private past foreign fine common poor natural
significant similar hot dead central happy serious ready simple left physical general environmental
financial blue democratic dark various entire close legal religious cold final main green nice huge
popular traditional cultural quickly slowly never always often sometimes today tomorrow yesterday here
where why again still very really almost already together across under between through during before
against without within around upon toward run walk read write speak listen learn teach build break bring
carry hold keep leave start stop help move live believe happen sit stand lose pay meet include continue
set lead understand watch follow create spend grow offer remember love consider appear buy wait serve die
send expect stay fall cut reach kill remain
"""
