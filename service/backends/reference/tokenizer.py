"""The reference backend's tokenizer: a small byte-level BPE that is the same on every machine.

The serialized `tokenizer.json` beside this module is what the backend loads; `build_tokenizer_json`
rebuilds it from the embedded corpus and a test asserts the two are byte-identical, so the shipped
file can always be regenerated (`python -m service.backends.reference.tokenizer`) and reviewed.
"""

from __future__ import annotations

import codecs
from functools import cache
from importlib import resources
from pathlib import Path

import xxhash
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, THINK_OPEN, THINK_CLOSE, TOOL_CALL_OPEN, TOOL_CALL_CLOSE)

VOCAB_SIZE = 3072
TOKENIZER_FILE = "tokenizer.json"

# Words the deterministic generator draws replies from; they are in the corpus so replies
# tokenize into whole-word tokens, like a real model's output would.
WORDS = [
    "the",
    "model",
    "reads",
    "every",
    "token",
    "once",
    "and",
    "keeps",
    "the",
    "cache",
    "warm",
    "while",
    "the",
    "agent",
    "plans",
    "its",
    "next",
    "step",
    "so",
    "a",
    "long",
    "history",
    "costs",
    "little",
    "when",
    "only",
    "the",
    "new",
    "part",
    "is",
    "sent",
    "the",
    "service",
    "checks",
    "each",
    "handle",
    "before",
    "it",
    "trusts",
    "it",
    "and",
    "falls",
    "back",
    "to",
    "a",
    "full",
    "render",
    "when",
    "anything",
    "changed",
    "prefix",
    "blocks",
    "stay",
    "shared",
    "across",
    "turns",
    "of",
    "one",
    "conversation",
    "but",
    "never",
    "across",
    "tenants",
    "because",
    "each",
    "tenant",
    "has",
    "its",
    "own",
    "salt",
    "tools",
    "return",
    "results",
    "that",
    "the",
    "assistant",
    "quotes",
    "back",
    "and",
    "reasoning",
    "stays",
    "hidden",
    "unless",
    "the",
    "template",
    "keeps",
    "it",
    "in",
    "the",
    "history",
]

_CORPUS_ENGLISH = """
Conversation state matters for agents. An agent sends the same growing history on every turn,
and the server renders it with a chat template, tokenizes it, and looks up the prefix cache. When
the history is long, rendering and sending it again costs time on every single request. A cache
reference lets the caller send only the new messages together with a handle that names the tokens
the server already holds. The server must verify the handle before it trusts it: the handle may be
unknown, expired, made under another fingerprint, or describe a different prefix. If anything does
not match, the caller falls back to the full history, and nothing is ever generated from a wrong
prefix. A wrong cache reuse is worse than none, because it silently changes what the model sees.

The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. How vexingly
quick daft zebras jump! Sphinx of black quartz, judge my vow. The weather today is sunny with a
light breeze from the west, and the temperature will reach twenty degrees in the afternoon.
Tomorrow brings clouds, some rain in the morning, and clearer skies by the evening. Please book a
table for four people at seven o'clock, near the window if possible, and confirm by email.

Answer the question using the tool results. The user asked about the weather in Paris and the
population of Berlin. The assistant called a function, received the result, and then wrote a
short summary. Reasoning: low. Reasoning: medium. Reasoning: high. The system prompt says: You are
a helpful assistant. Be concise, be correct, and cite your sources. Think step by step before you
answer, then give the final answer on its own line. If you are not sure, say that you do not know.

Every request carries a model name, a list of messages, optional tools, and sampling settings
such as temperature, top_p, max_tokens, seed and stop sequences. The response holds choices, each
with a message, a finish reason, and usage counters for prompt tokens, completion tokens and the
total. Cached tokens are reported in the prompt token details. Streaming responses arrive as server
sent events; each chunk carries a delta, and the stream ends with a done marker.
"""

_CORPUS_CODE = '''
def render_messages(messages: list[dict[str, object]], tools: list[dict] | None = None) -> str:
    """Render chat messages into one prompt string."""
    parts: list[str] = []
    for index, message in enumerate(messages):
        role = message.get("role", "user")
        content = message.get("content") or ""
        if isinstance(content, list):
            content = "\\n".join(part["text"] for part in content if part.get("type") == "text")
        parts.append(f"<|im_start|>{role}\\n{content}<|im_end|>\\n")
    if tools:
        parts.insert(0, json.dumps(tools, sort_keys=True, separators=(",", ":")))
    return "".join(parts)


class HandleRegistry:
    def __init__(self, capacity: int, ttl_seconds: float) -> None:
        self._entries: OrderedDict[str, Handle] = OrderedDict()
        self._capacity = capacity
        self._ttl = ttl_seconds

    def get(self, ref: str, now: float) -> Handle | None:
        entry = self._entries.get(ref)
        if entry is None or entry.expires_at <= now:
            return None
        self._entries.move_to_end(ref)
        return entry

    def put(self, handle: Handle) -> None:
        self._entries[handle.ref] = handle
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)


async def fetch_json(client: httpx.AsyncClient, url: str, payload: dict) -> dict:
    response = await client.post(url, json=payload, timeout=30.0)
    response.raise_for_status()
    return response.json()


for i in range(10):
    if i % 2 == 0:
        print("even", i)
    else:
        print("odd", i)
return {"status": "ok", "count": len(items), "items": [item.to_dict() for item in items]}
import asyncio, json, os, sys, time
from typing import Any, Optional
raise ValueError("invalid value: expected a positive integer, got %r" % (value,))
const result = await fetch(`/v1/chat/completions`, { method: "POST", body: JSON.stringify(body) });
if (!result.ok) { throw new Error(`request failed: ${result.status}`); }
SELECT id, tenant_id, created_at FROM responses WHERE conversation_id = $1 ORDER BY position;
'''

_CORPUS_JSON = """
{"model":"ref-chatml","messages":[{"role":"system","content":"You are a helpful assistant."},
{"role":"user","content":"What is the weather in Paris?"}],"temperature":0.7,"max_tokens":256}
{"type":"function","function":{"name":"get_weather","description":"Get the current weather",
"parameters":{"type":"object","properties":{"city":{"type":"string"},"unit":{"type":"string",
"enum":["celsius","fahrenheit"]},"days":{"type":"integer"},"verbose":{"type":"boolean"}},
"required":["city"]}}}
{"id":"call_0a1b2c3d4e5f","type":"function","function":{"name":"search","arguments":"{\\"query\\":\\"x\\"}"}}
{"role":"tool","tool_call_id":"call_0a1b2c3d4e5f","content":"{\\"temperature\\":21,\\"sky\\":\\"clear\\"}"}
{"usage":{"prompt_tokens":1024,"completion_tokens":64,"total_tokens":1088,
"prompt_tokens_details":{"cached_tokens":1008},"completion_tokens_details":{"reasoning_tokens":12}}}
{"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hello"},"finish_reason":null}]}
{"error":{"message":"The model does not exist.","type":"NotFoundError","param":"model","code":404}}
{"prompt_cache":{"ref":"pc_00ff","tokens":4096,"prefix_hash":"9f86d081884c7d65","fingerprint":"ab12"}}
[1, 2, 3, 4.5, -6, true, false, null, "text", {"nested": {"deeper": [0, 1e10]}}]
"""

_CORPUS_TEMPLATE = """
<|im_start|>system
You are a helpful assistant.

# Tools
[{"function":{"name":"get_weather","parameters":{"properties":{"city":{"type":"string"}}}}}]

Reasoning: high<|im_end|>
<|im_start|>user
Hello, who are you?<|im_end|>
<|im_start|>assistant
<think>The user greets me.</think>Answer 12: I am the assistant.<|im_end|>
<|im_start|>assistant
<tool_call>{"name":"get_weather","arguments":{"city":"x"}}</tool_call><|im_end|>
<|im_start|>tool
tool_call_id: call_0a1b2c3d4e5f
{"temperature":21}<|im_end|>
<image:0123456789abcdef> <file:report.pdf:fedcba9876543210>
"""

_CORPUS_VOCABULARY = """
about above accept access account across action active actually add address after again against
age agent ago agree ahead air all allow almost alone along already also although always among
amount analysis and animal another answer any anyone anything appear apply approach area argue
arm around arrive art article artist ask assume attack attention audience author authority
available avoid away baby back bad bag ball bank bar base beat beautiful because become bed before
begin behavior behind believe benefit best better between beyond big bill billion bit black blood
blue board body book born both box boy break bring brother budget build building business but buy
call camera campaign can cancer candidate capital car card care career carry case catch cause cell
center central century certain certainly chair challenge chance change character charge check child
choice choose church citizen city civil claim class clear clearly close coach cold collection
college color come commercial common community company compare computer concern condition
conference congress consider consumer contain continue control cost could country couple course
court cover create crime cultural culture cup current customer cut dark data daughter day dead deal
death debate decade decide decision deep defense degree democrat describe design despite detail
determine develop development difference different difficult dinner direction director discover
discuss discussion disease doctor dog door down draw dream drive drop drug during each early east
easy eat economic economy edge education effect effort eight either election else employee end
energy enjoy enough enter entire environment environmental especially establish even evening event
ever every everybody everyone everything evidence exactly example executive exist expect experience
expert explain eye face fact factor fail fall family far fast father fear federal feel feeling few
field fight figure fill film final finally financial find fine finger finish fire firm first fish
five floor fly focus follow food foot force foreign forget form former forward four free friend
from front full fund future game garden gas general generation girl give glass goal good government
great green ground group grow growth guess gun guy hair half hand hang happen happy hard have head
health hear heart heat heavy help her here herself high him himself his history hit hold home hope
hospital hot hotel hour house how however huge human hundred husband idea identify image imagine
impact important improve include including increase indeed indicate individual industry information
inside instead institution interest interesting international interview into investment involve
issue item itself job join just keep key kid kill kind kitchen know knowledge land language large
last late later laugh law lawyer lay lead leader learn least leave left leg legal less let letter
level lie life light like likely line list listen little live local long look lose loss lot love low
machine magazine main maintain major majority make man manage management manager many market
marriage material matter maybe mean measure media medical meet meeting member memory mention message
method middle might military million mind minute miss mission modern moment money month more morning
most mother mouth move movement movie much music must myself name nation national natural nature near
nearly necessary need network never news newspaper next nice night none nor north not note nothing
notice now number occur off offer office officer official often oil old once one only onto open
operation opportunity option order organization other others our out outside over own owner page pain
painting paper parent part participant particular particularly partner party pass past patient
pattern pay peace people per perform performance perhaps period person personal phone physical pick
picture piece place plan plant play player point police policy political politics poor popular
population position positive possible power practice prepare present president pressure pretty
prevent price private probably problem process produce product production professional professor
program project property protect prove provide public pull purpose push put quality question quickly
quite race radio raise range rate rather reach read ready real reality realize really reason receive
recent recently recognize record red reduce reflect region relate relationship religious remain
remember remove report represent republican require research resource respond response
responsibility rest result return reveal rich right rise risk road rock role room rule run safe same
save say scene school science scientist score sea season seat second section security see seek seem
sell send senior sense series serious serve service set seven several shake share she shoot short
shot should shoulder show side sign significant similar simple simply since sing single sister sit
site situation six size skill skin small smile social society soldier some somebody someone
something sometimes son song soon sort sound source south southern space speak special specific speech
spend sport spring staff stage stand standard star start state statement station stay still stock
stop store story strategy street strong structure student study stuff style subject success
successful such suddenly suffer suggest summer support sure surface system table take talk task tax
teach teacher team technology television tell ten tend term test than thank that their them
themselves then theory there these they thing think third this those though thought thousand threat
three through throughout throw thus time today together tonight too top total tough toward town trade
traditional training travel treat treatment tree trial trip trouble true truth try turn type under
understand unit until upon use usually value various very victim view violence visit voice vote wait
walk wall want war watch water way weapon wear week weight well west western what whatever when where
whether which while white who whole whom whose why wide wife will win wind window wish with within
without woman wonder word work worker world worry would write writer wrong yard yeah year yes yet you
young your yourself
"""


def training_corpus() -> list[str]:
    return [
        _CORPUS_ENGLISH,
        _CORPUS_VOCABULARY,
        _CORPUS_CODE,
        _CORPUS_JSON,
        _CORPUS_TEMPLATE,
        " ".join(WORDS),
    ]


def build_tokenizer_json() -> str:
    """Train the BPE on the embedded corpus and serialize it (deterministic)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(training_corpus(), trainer=trainer)
    return tokenizer.to_str(pretty=False)


@cache
def tokenizer_bytes() -> bytes:
    return (resources.files(__package__) / TOKENIZER_FILE).read_bytes()


@cache
def load_tokenizer() -> Tokenizer:
    return Tokenizer.from_str(tokenizer_bytes().decode("utf-8"))


@cache
def tokenizer_fingerprint() -> str:
    return xxhash.xxh3_128_hexdigest(tokenizer_bytes())


def token_byte_table(tokenizer: Tokenizer) -> list[bytes]:
    """Raw bytes of every token id, so streamed pieces can be decoded incrementally and exactly."""
    byte_of = _byte_level_decoder()
    special = set(SPECIAL_TOKENS)
    table: list[bytes] = []
    for token_id in range(tokenizer.get_vocab_size(with_added_tokens=True)):
        token = tokenizer.id_to_token(token_id)
        if token is None:
            raise ValueError(f"tokenizer has no token {token_id}")
        table.append(token.encode("utf-8") if token in special else bytes(byte_of[ch] for ch in token))
    return table


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's printable-char -> byte table, which the ByteLevel pre-tokenizer uses."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def utf8_pieces(chunks: list[bytes]) -> list[str]:
    """Decode byte chunks so that the pieces concatenate to the whole decoded text."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces = [decoder.decode(chunk) for chunk in chunks]
    if pieces:
        pieces[-1] += decoder.decode(b"", final=True)
    return pieces


def main() -> None:
    target = Path(__file__).with_name(TOKENIZER_FILE)
    target.write_text(build_tokenizer_json(), encoding="utf-8")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
