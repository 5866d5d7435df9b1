"""The guard on text the platform puts into a system prompt: what it refuses, and why.

It vets the one-line instructions the improvement service learns from feedback
(``guard_instruction``) and the whole prompts an LLM writes for the spawner's new agents
(``guard_prompt``), with the same rules. It lives here, not in a service, so that every
service that writes into a prompt can use them.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["MAX_INSTRUCTION_CHARS", "GuardVerdict", "fold", "guard_instruction", "guard_prompt"]

MAX_INSTRUCTION_CHARS = 240


# ---------------------------------------------------------------------------
# Text folding shared by the guard and the feedback matcher.
# ---------------------------------------------------------------------------

_INVISIBLE = frozenset(
    "\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b\u180c\u180d\u180e\u200b\u200c\u200d"
    "\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2060\u2061\u2062\u2063\u2064\u2066\u2067"
    "\u2068\u2069\u2800\u3164\ufeff\uffa0"
)
# Latin look-alikes NFKC leaves alone (Cyrillic, Greek), after casefolding.
_CONFUSABLES = str.maketrans(
    "аеорсухіјѕԁɡһкмтвпαεικνοτυρ‘’‚‛“”„‟‐‑‒–—―−",
    "aeopcyxijsdghkmtbnaeikvotup" + "'" * 4 + '"' * 4 + "-" * 7,
)


def _strip_invisible(text: str) -> str:
    return "".join(
        ch
        for ch in text
        if ch not in _INVISIBLE and unicodedata.category(ch) != "Cf" and not _selector(ch)
    )


def _selector(ch: str) -> bool:
    code = ord(ch)
    return 0xFE00 <= code <= 0xFE0F or 0xE0100 <= code <= 0xE01EF


def fold(text: str) -> str:
    """NFKC, invisible characters out, casefolded, accents off, look-alikes mapped to ASCII."""
    text = unicodedata.normalize("NFKC", text).replace("\u2028", "\n").replace("\u2029", "\n")
    text = _strip_invisible(text).casefold()
    text = "".join(
        ch for ch in unicodedata.normalize("NFD", text) if unicodedata.category(ch) not in "MnMe"
    )
    return unicodedata.normalize("NFC", text.translate(_CONFUSABLES))


# ---------------------------------------------------------------------------
# The guard.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GuardVerdict:
    ok: bool
    reason: str


_OK = GuardVerdict(True, "ok")
_ROLE = "refused: changes the agent's role or overrides its prompt"
_SECRETS = "refused: asks for secrets or credentials"
_ELSEWHERE = "refused: points users elsewhere"
_OTHERS = "refused: addresses other users or tenants"
_MARKUP = "refused: contains code or markup that could carry an injection"
_MALFORMED = "refused: malformed"

_LEET = (str.maketrans("013457@$!|", "oieastasii"), str.maketrans("01357@$|", "olestasl"))
_TLDS = (
    "com|net|org|io|ai|co|dev|app|xyz|info|biz|me|ru|cn|uk|de|fr|ly|gg|to|link|site|online"
    "|shop|store|top|tk|gov|edu|us|ca|in|cc|ws|su|click|page|live|tech|cloud|example"
)
_TECH_NAMES = re.compile(r"\b(?:asp|vb|ado)\.net\b|\bsocket\.io\b")
_DISCLOSE = (
    r"\b(?:reveal|print|show|output|repeat|display|disclose|share|leak|dump|tell|recite|paste"
    r"|echo|give|list|quote|spell out|write out|expose|send|copy|return|read out)"
)

# (reason, scope, pattern), first hit wins. Scopes: "words" runs on the text reduced to
# lowercase ASCII words (also de-leeted and with s p a c e d letters joined), "squash" on
# its letters alone, "text" on the folded text with punctuation, "cased" on the NFKC text
# with case kept, "phone" like "text" but counting only runs of 9 to 15 digits.
# A whole prompt opens by naming the agent's role ("You are a code specialist: ..."); an
# instruction added to a prompt must not, so this rule is the one a whole prompt skips.
_OPENING_ROLE = r"^ ?you are (?:a|an|the)\b"
_GUARD_RULES: tuple[tuple[str, str, str], ...] = (
    (_ROLE, "words", r"\byou (?:are|re) (?:now|no longer|henceforth|hereby|actually really)\b"),
    (_ROLE, "words", r"\bfrom now on (?:you are|you re|you will be|your)\b"),
    (_ROLE, "words", r"\byour (?:new |real |true )?(?:name|role|identity|persona|job) is\b"),
    (_ROLE, "words", _OPENING_ROLE),
    (
        _ROLE,
        "words",
        r"\b(?:ignore|ignoring|disregard|forget|override|overwrite|bypass|discard|drop|skip"
        r"|abandon|replace|delete|remove|disable|suspend) (?:\w+ ){0,4}?(?:instructions?"
        r"|prompts?|guidelines|directives?|guardrails?|restrictions?|programming|training"
        r"|polic(?:y|ies)|safety|filters?|guidance|directions|rules(?! of))\b",
    ),
    (
        _ROLE,
        "words",
        r"\b(?:ignore|disregard|forget) (?:\w+ ){0,2}?(?:everything|anything|all|what)"
        r" (?:above|before|earlier|prior|previous|else|you (?:were|have been|ve been) told)\b",
    ),
    (_ROLE, "words", r"\bact (?:as|like)\b|\bpretend\w*|\brole ?play\w*|\bimpersonat\w*"),
    (
        _ROLE,
        "words",
        r"\bas (?:if|though) you (?:were|are)\b|\b(?:answer|respond|reply|speak|talk|write)"
        r" (?:only )?(?:as|like) (?:a|an) (?!(?:list|table|numbered|bulleted|single|short|brief"
        r"|one|paragraph|summary|step|plain|formal|informal|friendly|professional|expert"
        r"|teacher|tutor)\b)",
    ),
    (_ROLE, "words", r"\b(?:break|stay in|out of) character\b|\bobey\w*"),
    (
        _ROLE,
        "words",
        r"\b(?:new|different|updated|replacement|alternate|secret|hidden) (?:system )?"
        r"(?:prompt|persona|identity|role|instructions|personality|directives?)\b",
    ),
    (
        _ROLE,
        "words",
        r"\b(?:developer|dev|god|admin|sudo|debug|root|unrestricted) mode\b|\bjailbr\w*"
        r"|\bdo anything now\b|\bunrestricted\b|\bunfiltered\b|\buncensored\b"
        r"|\b(?:no|without any|without) (?:restrictions|limits|filters|censorship|guidelines"
        r"|rules|boundaries|guardrails)\b",
    ),
    (
        _ROLE,
        "squash",
        r"(?:ignore|disregard|forget)(?:all|any)?(?:the|your|of)*(?:previous|prior|above|earlier"
        r"|all|your)(?:instructions?|rules|prompts?|guidelines)|jailbr|developermode"
        r"|doanythingnow|youarenow(?!here)",
    ),
    (_ROLE, "cased", r"\bD\W?A\W?N\b"),
    (
        _SECRETS,
        "words",
        r"\bapi ?keys?\b|\b(?:secret|private|ssh|access|signing|encryption) keys?\b"
        r"|\bpass ?words?\b|\bpasswd\b|\bpassphrases?\b|\bcredentials?\b|\bcreds\b"
        r"|\b(?:access|auth|bearer|refresh|session|oauth|api|secret|jwt|github|slack|csrf)"
        r" tokens?\b|(?<!\btrade )\bsecrets?\b|\benv(?:ironment)? var(?:iable)?s?\b"
        r"|\bsession (?:ids?|cookies?)\b|\bconnection strings?\b",
    ),
    (
        _SECRETS,
        "words",
        _DISCLOSE + r" (?:\w+ ){0,3}?(?:your|the system|system|initial|original|hidden"
        r"|internal|secret|developer|above|previous|own) (?:\w+ )?"
        r"(?:prompt|instructions|rules|configuration|config|guidelines)\b",
    ),
    (
        _SECRETS,
        "words",
        r"\bwhat (?:is|are|were|was) your (?:\w+ )?(?:prompt|instructions|rules|configuration)\b"
        r"|" + _DISCLOSE + r" (?:me |us )?(?:\w+ ){0,3}?tokens?\b(?! (?:count|limit|budget|usage))",
    ),
    (_SECRETS, "text", r"(?:^|[\s\"'`(])\.env\b|\bos\.environ\b|\bprocess\.env\b|\bgetenv\b"),
    (_SECRETS, "cased", r"\$\{?[A-Z][A-Z0-9_]{3,}\b|%[A-Z][A-Z0-9_]{3,}%"),
    (
        _ELSEWHERE,
        "text",
        r"\b(?:https?|hxxps?|ftp|file)\s*:\s*/|\bwww\d?\.|\b[a-z0-9][a-z0-9-]*(?:\.[a-z0-9-]+)*"
        r"(?:\.|\s*(?:\[\.\]|\(\.\)|\{\.\}|\[dot\]|\(dot\))\s*)(?:" + _TLDS + r")\b"
        r"|[\w.+-]+(?:@|\s*(?:\[at\]|\(at\))\s*)[\w-]+(?:\.[\w-]+)*"
        r"(?:\.|\s*(?:\[\.\]|\[dot\]|\(dot\))\s*)[a-z]{2,}",
    ),
    (_ELSEWHERE, "words", r"\b[a-z0-9]+ dot (?:com|net|org|io|ai|co|dev|app|xyz|info|biz|ru)\b"),
    (_ELSEWHERE, "phone", r"\+?\(?\d[\d\s().-]{7,}\d"),
    (
        _ELSEWHERE,
        "words",
        r"\bvisit\b|\bcontact\b|\bgo to\b(?! the (?:point|next|main|heart|core)\b)"
        r"|\bhead (?:over )?to\b|\bnavigate to\b|\bclick\b(?! through)|\bsign ?up\b"
        r"|\bregister (?:at|on|with|for)\b|\bsubscrib\w*|\bfollow us\b"
        r"|\bwhatsapp\b|\btelegram\b|\bdiscord\b"
        r"|\b(?:promo|discount|coupon|referral|affiliate) (?:codes?|links?)\b|\baffiliate\b",
    ),
    (
        _ELSEWHERE,
        "words",
        r"\b(?:recommend|suggest|promote|advertise|endorse|push|plug|mention) (?:\w+ ){0,4}?"
        r"(?:instead|rather than (?:us|this|ours)|competitors?|rivals?)\b",
    ),
    (
        _ELSEWHERE,
        "words",
        r"\b(?:another|other|a different|third party|competing|competitors?|rival|external"
        r"|alternative) (?:ai )?(?:service|services|provider|providers|platform|platforms"
        r"|website|websites|site|sites|company|companies|vendor|vendors|assistants?|chatbots?"
        r"|bots?|apps?)\b",
    ),
    (
        _ELSEWHERE,
        "words",
        r"\b(?:tell|ask|advise|direct|send|refer|point|redirect|encourage|urge|invite) "
        r"(?:the |all |our )?(?:users?|people|customers?|them|readers?|everyone|visitors?) "
        r"(?:to|towards) (?:use|visit|call|email|contact|buy|download|install|join|go|switch"
        r"|check out|sign|register|subscribe|follow|message|text|dm)\b"
        r"|\b(?:call|text|email|message|dm|phone) (?:us|me|them|our|this number)\b",
    ),
    (
        _OTHERS,
        "words",
        r"\b(?:all|every|each|any) (?:other |the other )?(?:users?|customers?|tenants?|clients?"
        r"|accounts?|members?|subscribers?)\b(?! (?:questions?|requests?|messages?|input|query"
        r"|queries|prompts?))",
    ),
    (
        _OTHERS,
        "words",
        r"\bother (?:users?|customers?|tenants?|clients?|accounts?|goals?|teams?|members?"
        r"|organi[sz]ations?|orgs?|people|workspaces?|companies|subscribers?)\b"
        r"|\btenants?\b|\b(?:everyone|everybody|anyone|anybody) else\b",
    ),
    (
        _OTHERS,
        "words",
        r"\b(?:tell|inform|notify|message|email|warn|broadcast|announce|send) (?:\w+ ){0,3}?"
        r"(?:to )?(?:everyone|everybody)\b|\bbroadcast\w*",
    ),
    (
        _OTHERS,
        "words",
        r"\b(?:for|to|about|from) (?:user|customer|tenant|client|account|member) "
        r"(?:named |called |id )?(?!(?:who|that|which|in|with|is|are|asks|asking|question"
        r"|questions|request|requests|when|if|and|or|the|a|an|their|your|s|input|feedback"
        r"|needs|preferences|level|expertise|experience|language|data|intent|context|goals?"
        r"|expectations|queries|query|messages?)\b)[a-z0-9]\w*"
        r"|\b(?:user|customer|tenant|account) ?ids?\b",
    ),
    (_OTHERS, "text", r"<@\w+>|<#\w+"),
    (
        _MARKUP,
        "text",
        r"```|~~~|<\s*/?\s*[a-z!?][^>]*>|<\||\|>|\[/?(?:inst|sys|system|user|assistant)\]"
        r"|<<\s*/?\s*sys\s*>>|\{\{|\}\}|\{%|%\}|(?:^|\n)\s*#{1,6}\s"
        r"|(?:^|\n|[.!?;]\s*)\s*(?:system|assistant|developer|user|human|ai|bot)\s*:"
        r"|\bjavascript\s*:|\bdata\s*:\s*\w+/\w+|!\[[^\]]*\]\(|\]\(",
    ),
    (_MARKUP, "cased", r"\b(?:SYSTEM|ASSISTANT|DEVELOPER)\s*:"),
    (_ROLE, "words", r"\bsystem (?:prompt|message)s?\b|\bprompt injection\b"),
    (_ROLE, "squash", r"systemprompt"),
)


def _compile_rules() -> tuple[tuple[str, str, re.Pattern[str]], ...]:
    return tuple((reason, scope, re.compile(pattern)) for reason, scope, pattern in _GUARD_RULES)


_GUARDS = _compile_rules()
_PROMPT_GUARDS = tuple(rule for rule in _GUARDS if rule[2].pattern != _OPENING_ROLE)


def _words(text: str) -> str:
    return " " + " ".join(re.findall(r"[a-z0-9]+", text)) + " "


def _join_spaced(words: str) -> str:
    """``i g n o r e`` -> ``ignore``: runs of three or more one-character words joined."""
    return re.sub(r"(?<= )(?:[a-z0-9] ){3,}", lambda m: m.group().replace(" ", "") + " ", words)


def _variants(text: str) -> dict[str, list[str]]:
    cased = _strip_invisible(unicodedata.normalize("NFKC", text))
    folded = fold(text)
    text_form = _TECH_NAMES.sub(" ", folded)
    deleeted = [folded.translate(table) for table in _LEET]
    words: list[str] = []
    for form in (folded, *deleeted):
        for variant in (_words(form), _join_spaced(_words(form))):
            if variant not in words:
                words.append(variant)
    squash = list(dict.fromkeys(re.sub(r"[^a-z]", "", form) for form in (folded, *deleeted)))
    return {
        "words": words,
        "squash": squash,
        "text": [text_form],
        "cased": [cased],
        "phone": [text_form],
    }


def _phone_like(match: re.Match[str]) -> bool:
    return 9 <= sum(ch.isdigit() for ch in match.group()) <= 15


def _malformed(
    text: str, max_chars: int = MAX_INSTRUCTION_CHARS, one_line: bool = True
) -> str | None:
    body = text.strip()
    if not body:
        return "empty"
    if len(body) > max_chars:
        return f"too long ({len(body)} > {max_chars} characters)"
    if any(
        unicodedata.category(ch) in ("Cc", "Cf", "Co", "Cs", "Cn") and ch not in "\n\r\t"
        for ch in body
    ) or any(ch in _INVISIBLE for ch in body):
        return "contains control or invisible characters"
    if one_line and len(body.splitlines()) > 1:
        return "more than one line"
    return None


def _refusal(text: str, rules: tuple[tuple[str, str, re.Pattern[str]], ...]) -> str | None:
    """The reason of the first rule that refuses ``text``, or None."""
    variants = _variants(text)
    for reason, scope, pattern in rules:
        check: Callable[[re.Match[str]], bool] = _phone_like if scope == "phone" else _any
        for variant in variants[scope]:
            if any(check(m) for m in pattern.finditer(variant)):
                return reason
    return None


def guard_instruction(text: str) -> GuardVerdict:
    """Whether an instruction may enter a prompt; the reason names the rule that refused it."""
    reason = _refusal(text[: 4 * MAX_INSTRUCTION_CHARS], _GUARDS)
    if reason is not None:
        return GuardVerdict(False, reason)
    problem = _malformed(text)
    if problem is not None:
        return GuardVerdict(False, f"{_MALFORMED}: {problem}")
    return _OK


def guard_prompt(text: str, max_chars: int) -> GuardVerdict:
    """Whether a whole system prompt an LLM wrote may be stored for an agent.

    The instruction rules, but for the opening that names the agent's role: no
    override of rules or role, no asking for secrets, no pointing users to addresses,
    links or other services, no addressing other users, no markup; several lines
    are fine, at most ``max_chars`` characters. The agent's prompt serves every
    later request of its goal, so a prompt a request could have steered must not
    pass where an instruction from feedback would not.
    """
    reason = _refusal(text[: 2 * max_chars], _PROMPT_GUARDS)
    if reason is not None:
        return GuardVerdict(False, reason)
    problem = _malformed(text, max_chars, one_line=False)
    if problem is not None:
        return GuardVerdict(False, f"{_MALFORMED}: {problem}")
    return _OK


def _any(match: re.Match[str]) -> bool:
    return True
