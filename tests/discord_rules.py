"""Discord's validation rules for what a bot sends, as the emulator enforces them.

Each rule cites the page of Discord's developer documentation it comes from
(https://discord.com/developers/docs/...); the limits are the same as in
Discord's published OpenAPI description (discord/discord-api-spec, openapi.json:
``maxLength``/``maxItems``/``pattern`` of the request schemas). A broken payload
is answered as Discord answers it: HTTP 400 with JSON code 50035 "Invalid Form
Body" and an ``errors`` tree that mirrors the payload (array indices as string
keys, each leaf ``{"_errors": [{"code", "message"}]}``), e.g.

    {"code": 50035, "message": "Invalid Form Body",
     "errors": {"components": {"0": {"components": {"0": {"label": {"_errors": [
         {"code": "BASE_TYPE_MAX_LENGTH", "message": "Must be 80 or fewer in length."}]}}}}}}}

Other rejections use their own codes (topics/opcodes-and-status-codes#json):
50006 empty message, 40005 request entity too large, 40060 interaction already
acknowledged, 10062 unknown interaction, 50027 invalid webhook token, 50013
missing permissions, 50001 missing access.

This module knows nothing about the emulator's state: functions take a payload
and raise ``DiscordError``; the emulator calls them for every request.
"""

from __future__ import annotations

import re
from typing import Any

Json = dict[str, Any]
Path = tuple[str | int, ...]
MiB = 1024 * 1024

DOCS = "https://discord.com/developers/docs"
COMPONENTS_DOC = f"{DOCS}/components/reference"
EMBED_LIMITS_DOC = f"{DOCS}/resources/message#embed-object-embed-limits"
CREATE_MESSAGE_DOC = f"{DOCS}/resources/message#create-message"
COMMANDS_DOC = f"{DOCS}/interactions/application-commands#application-command-object"
NAMING_DOC = (
    f"{DOCS}/interactions/application-commands"
    "#application-command-object-application-command-naming"
)
RESPONSES_DOC = f"{DOCS}/interactions/receiving-and-responding#responding-to-an-interaction"
AUTOCOMPLETE_DOC = (
    f"{DOCS}/interactions/receiving-and-responding#interaction-response-object-autocomplete"
)
MODAL_DOC = f"{DOCS}/interactions/receiving-and-responding#interaction-response-object-modal"
UPLOADS_DOC = f"{DOCS}/reference#uploading-files"
RATE_LIMITS_DOC = f"{DOCS}/topics/rate-limits"
PERMISSIONS_DOC = f"{DOCS}/topics/permissions"

IS_COMPONENTS_V2 = 1 << 15

# components/reference#component-object-component-types
ACTION_ROW, BUTTON, STRING_SELECT, TEXT_INPUT = 1, 2, 3, 4
USER_SELECT, ROLE_SELECT, MENTIONABLE_SELECT, CHANNEL_SELECT = 5, 6, 7, 8
SELECT_TYPES = (STRING_SELECT, USER_SELECT, ROLE_SELECT, MENTIONABLE_SELECT, CHANNEL_SELECT)
# Components V2 layout/content types (section, text display, thumbnail, media gallery,
# file, separator, container, label): allowed only with IS_COMPONENTS_V2 (or in modals: label).
V2_TYPES = (9, 10, 11, 12, 13, 14, 17)
LABEL = 18
KNOWN_TYPES = (ACTION_ROW, BUTTON, TEXT_INPUT, *SELECT_TYPES, *V2_TYPES, LABEL)
BUTTON_STYLES = (1, 2, 3, 4, 5, 6)  # primary, secondary, success, danger, link, premium
LINK_STYLE, PREMIUM_STYLE = 5, 6

# application-command-naming: ^[-_'\p{L}\p{N}\p{sc=Deva}\p{sc=Thai}]{1,32}$; Python's \w is
# letters, digits and underscore in every script (Devanagari and Thai included).
COMMAND_NAME = re.compile(r"^[-_'\w]{1,32}$")
CHAT_INPUT = 1
SUBCOMMAND_TYPES = (1, 2)
STRING_OPTION = 3


class DiscordError(Exception):
    """An error answer, shaped like Discord's: HTTP status, JSON code and message."""

    def __init__(self, status: int, code: int, message: str, errors: Json | None = None) -> None:
        super().__init__(f"{status} {code} {message}")
        self.status, self.code, self.message, self.errors = status, code, message, errors

    def body(self) -> Json:
        body: Json = {"message": self.message, "code": self.code}
        if self.errors:
            body["errors"] = self.errors
        return body


class FormErrors:
    """Collects every field error of one request, as Discord reports them all at once."""

    def __init__(self) -> None:
        self.tree: Json = {}

    def add(self, path: Path, code: str, message: str) -> None:
        node = self.tree
        for part in path:
            node = node.setdefault(str(part), {})
        node.setdefault("_errors", []).append({"code": code, "message": message})

    def max_length(self, path: Path, value: Any, limit: int) -> None:
        if value is not None and len(value) > limit:
            self.add(path, "BASE_TYPE_MAX_LENGTH", f"Must be {limit} or fewer in length.")

    def length_between(self, path: Path, value: Any, low: int, high: int, required: bool) -> None:
        if value is None:
            if required:
                self.add(path, "BASE_TYPE_REQUIRED", "This field is required")
            return
        if not low <= len(value) <= high:
            self.add(path, "BASE_TYPE_BAD_LENGTH", f"Must be between {low} and {high} in length.")

    def one_of(self, path: Path, value: Any, allowed: tuple[int, ...]) -> bool:
        if value not in allowed:
            choices = ", ".join(str(a) for a in allowed)
            self.add(path, "BASE_TYPE_CHOICES", f"Value must be one of {{{choices}}}.")
            return False
        return True

    def raise_if_any(self) -> None:
        if self.tree:
            raise DiscordError(400, 50035, "Invalid Form Body", self.tree)


def invalid_form(path: str, message: str, code: str = "BASE_TYPE_INVALID") -> DiscordError:
    """A 400 "Invalid Form Body" for one field, ``path`` dotted ("embeds.0.title")."""
    errors = FormErrors()
    errors.add(tuple(path.split(".")), code, message)
    return DiscordError(400, 50035, "Invalid Form Body", errors.tree)


def leaf_errors(body: Json) -> list[tuple[str, str, str]]:
    """(dotted path, code, message) for every leaf of a 50035 body's ``errors`` tree."""
    found: list[tuple[str, str, str]] = []

    def walk(node: Json, path: list[str]) -> None:
        for key, value in node.items():
            if key == "_errors":
                found.extend((".".join(path), e["code"], e["message"]) for e in value)
            else:
                walk(value, [*path, key])

    walk(body.get("errors") or {}, [])
    return found


# ---------------------------------------------------------------- messages


def embed_chars(embed: Json) -> int:
    """Characters that count toward the 6000 limit (EMBED_LIMITS_DOC)."""
    fields = embed.get("fields") or []
    parts = [
        embed.get("title") or "",
        embed.get("description") or "",
        (embed.get("footer") or {}).get("text") or "",
        (embed.get("author") or {}).get("name") or "",
    ]
    parts += [(f.get("name") or "") + (f.get("value") or "") for f in fields]
    return sum(len(p) for p in parts)


def check_embeds(errors: FormErrors, embeds: list[Json]) -> None:
    """EMBED_LIMITS_DOC: 10 embeds; title 256, description 4096, 25 fields (name 256 and
    value 1024, both required), footer text 2048, author name 256; 6000 in all."""
    if len(embeds) > 10:
        errors.add(("embeds",), "BASE_TYPE_MAX_LENGTH", "Must be 10 or fewer in length.")
    for i, embed in enumerate(embeds):
        at = ("embeds", i)
        errors.max_length((*at, "title"), embed.get("title"), 256)
        errors.max_length((*at, "description"), embed.get("description"), 4096)
        fields = embed.get("fields") or []
        if len(fields) > 25:
            errors.add((*at, "fields"), "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")
        for j, item in enumerate(fields):
            errors.length_between((*at, "fields", j, "name"), item.get("name"), 1, 256, True)
            errors.length_between((*at, "fields", j, "value"), item.get("value"), 1, 1024, True)
        if embed.get("footer") is not None:
            errors.max_length((*at, "footer", "text"), embed["footer"].get("text"), 2048)
        if embed.get("author") is not None:
            errors.max_length((*at, "author", "name"), embed["author"].get("name"), 256)
    if sum(embed_chars(e) for e in embeds) > 6000:
        errors.add(("embeds",), "BASE_TYPE_MAX_LENGTH", "Embed size exceeds maximum size of 6000")


def check_button(errors: FormErrors, at: Path, button: Json) -> None:
    """COMPONENTS_DOC#button: style 1-6; label ≤ 80; a link button has a ``url`` and no
    ``custom_id``; a premium one an ``sku_id``; every other button a ``custom_id``."""
    if not errors.one_of((*at, "style"), button.get("style"), BUTTON_STYLES):
        return
    errors.max_length((*at, "label"), button.get("label"), 80)
    style = button["style"]
    if style == LINK_STYLE:
        if not button.get("url"):
            errors.add((*at, "url"), "BASE_TYPE_REQUIRED", "This field is required")
        errors.max_length((*at, "url"), button.get("url"), 512)
        if button.get("custom_id") is not None:
            errors.add(
                (*at, "custom_id"),
                "BUTTON_COMPONENT_CUSTOM_ID_NOT_ALLOWED",
                "A custom id cannot be set for link buttons",
            )
    elif style == PREMIUM_STYLE:
        if not button.get("sku_id"):
            errors.add((*at, "sku_id"), "BASE_TYPE_REQUIRED", "This field is required")
    else:
        if button.get("url") is not None:
            errors.add((*at, "url"), "BUTTON_COMPONENT_URL_NOT_ALLOWED", "A url is only for links")
        if button.get("custom_id") is None:
            errors.add((*at, "custom_id"), "BASE_TYPE_REQUIRED", "This field is required")
    if style != PREMIUM_STYLE and not button.get("label") and not button.get("emoji"):
        errors.add((*at, "label"), "BUTTON_COMPONENT_INVALID", "A button needs a label or emoji")


def check_select(errors: FormErrors, at: Path, select: Json) -> None:
    """COMPONENTS_DOC#string-select: placeholder ≤ 150; min/max_values 0-25 (max ≥ 1);
    a string select has 1-25 options, each label and value 1-100 and description ≤ 100."""
    errors.max_length((*at, "placeholder"), select.get("placeholder"), 150)
    for key, low in (("min_values", 0), ("max_values", 1)):
        value = select.get(key)
        if value is not None and not low <= value <= 25:
            errors.add(
                (*at, key),
                "NUMBER_TYPE_MAX" if value > 25 else "NUMBER_TYPE_MIN",
                f"int value should be between {low} and 25.",
            )
    if select["type"] != STRING_SELECT:
        return
    options = select.get("options")
    if not options:
        errors.add((*at, "options"), "BASE_TYPE_REQUIRED", "This field is required")
        return
    if len(options) > 25:
        errors.add((*at, "options"), "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 25 in length.")
    for j, option in enumerate(options):
        where = (*at, "options", j)
        errors.length_between((*where, "label"), option.get("label"), 1, 100, True)
        errors.length_between((*where, "value"), option.get("value"), 1, 100, True)
        errors.max_length((*where, "description"), option.get("description"), 100)


def check_action_row(errors: FormErrors, at: Path, row: Json, in_modal: bool = False) -> None:
    """COMPONENTS_DOC#action-row: up to 5 buttons, or exactly one select (or, in a modal,
    one text input); never another row."""
    children = row.get("components") or []
    if not children:
        errors.add(
            (*at, "components"), "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 5 in length."
        )
        return
    kinds = [c.get("type") for c in children]
    if len(children) > 5:
        errors.add(
            (*at, "components"), "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 5 in length."
        )
    single = [k for k in kinds if k in SELECT_TYPES or k == TEXT_INPUT]
    if single and len(children) > 1:
        errors.add(
            (*at, "components"),
            "COMPONENT_LAYOUT_WIDTH_EXCEEDED",
            "The specified component exceeds the maximum width",
        )
    allowed = (TEXT_INPUT,) if in_modal else (BUTTON, *SELECT_TYPES)
    for j, child in enumerate(children):
        check_component(errors, (*at, "components", j), child, allowed)


def check_component(
    errors: FormErrors, at: Path, component: Json, allowed: tuple[int, ...]
) -> None:
    kind = component.get("type")
    if kind not in KNOWN_TYPES:
        errors.add(
            (*at, "type"),
            "UNION_TYPE_CHOICES",
            f'Value of field "type" must be one of ({", ".join(map(str, KNOWN_TYPES))}).',
        )
        return
    if kind not in allowed:
        errors.add(
            (*at, "type"), "COMPONENT_TYPE_INVALID", f"Component type {kind} is not allowed here"
        )
        return
    if kind == ACTION_ROW:
        check_action_row(errors, at, component)
    elif kind == BUTTON:
        check_button(errors, at, component)
    elif kind in SELECT_TYPES:
        check_select(errors, at, component)
    elif kind == TEXT_INPUT:
        check_text_input(errors, at, component)
    else:  # V2 containers and sections nest components of their own
        nested = (ACTION_ROW, *V2_TYPES)
        for j, child in enumerate(component.get("components") or []):
            check_component(errors, (*at, "components", j), child, nested)
        if isinstance(component.get("accessory"), dict):
            check_component(errors, (*at, "accessory"), component["accessory"], (BUTTON, 11))


def check_custom_ids(errors: FormErrors, components: list[Json]) -> None:
    """COMPONENTS_DOC#anatomy-of-a-component: ``custom_id`` 1-100 characters, unique
    within the message (or modal)."""
    seen: set[str] = set()
    for path, component in walk(components, ("components",)):
        custom_id = component.get("custom_id")
        if custom_id is None:
            continue
        errors.length_between((*path, "custom_id"), custom_id, 1, 100, True)
        if custom_id in seen:
            errors.add(
                (*path, "custom_id"),
                "COMPONENT_CUSTOM_ID_DUPLICATED",
                "Component custom id cannot be duplicated",
            )
        seen.add(custom_id)


def walk(components: list[Json], at: Path) -> list[tuple[Path, Json]]:
    """(path, component) for every component, nested ones included."""
    found: list[tuple[Path, Json]] = []
    for i, component in enumerate(components):
        if not isinstance(component, dict):
            continue
        here = (*at, i)
        found.append((here, component))
        found += walk(component.get("components") or [], (*here, "components"))
        for key in ("accessory", "component"):
            if isinstance(component.get(key), dict):
                found += [((*here, key), component[key])]
                found += walk(component[key].get("components") or [], (*here, key, "components"))
    return found


def check_components(errors: FormErrors, components: list[Json], v2: bool) -> None:
    """COMPONENTS_DOC: a legacy message holds up to 5 action rows; a Components-V2 one up to
    40 components in all, laid out by the V2 types."""
    if v2:
        if len(walk(components, ())) > 40:
            errors.add(("components",), "BASE_TYPE_MAX_LENGTH", "Must be 40 or fewer in length.")
        top = (ACTION_ROW, *V2_TYPES)
    else:
        if len(components) > 5:
            errors.add(("components",), "BASE_TYPE_MAX_LENGTH", "Must be 5 or fewer in length.")
        top = (ACTION_ROW,)
    for i, component in enumerate(components):
        check_component(errors, ("components", i), component, top)
    check_custom_ids(errors, components)


def check_message_body(body: Json) -> None:
    """CREATE_MESSAGE_DOC: content ≤ 2000; embeds and components as above; with the
    IS_COMPONENTS_V2 flag, no ``content``, ``embeds``, ``poll`` or ``stickers``."""
    errors = FormErrors()
    errors.max_length(("content",), body.get("content"), 2000)
    v2 = bool((body.get("flags") or 0) & IS_COMPONENTS_V2)
    if v2:
        for key in ("content", "embeds", "poll", "sticker_ids"):
            if body.get(key):
                errors.add(
                    (key,),
                    "MESSAGE_CANNOT_USE_LEGACY_FIELDS_WITH_COMPONENTS_V2",
                    "The 'content', 'embeds', 'stickers' and 'poll' fields cannot be used"
                    " when using MessageFlags.IS_COMPONENTS_V2",
                )
    check_embeds(errors, body.get("embeds") or [])
    check_components(errors, body.get("components") or [], v2)
    errors.raise_if_any()


def check_files(sizes: list[int], upload_limit: int) -> None:
    """UPLOADS_DOC: up to 10 files per message, each under the upload limit (10 MiB for an
    unboosted guild, or the interaction's ``attachment_size_limit``): 413 / 40005."""
    if len(sizes) > 10:
        raise invalid_form("files", "Must be 10 or fewer in length.", "BASE_TYPE_MAX_LENGTH")
    if any(size > upload_limit for size in sizes) or sum(sizes) > 25 * MiB:
        raise DiscordError(413, 40005, "Request entity too large")


def check_not_empty(body: Json, file_count: int) -> None:
    """CREATE_MESSAGE_DOC: at least one of content, embeds, sticker_ids, components, files
    or poll; else 50006 "Cannot send an empty message"."""
    keys = ("content", "embeds", "components", "sticker_ids", "poll", "attachments")
    if not file_count and not any(body.get(k) for k in keys):
        raise DiscordError(400, 50006, "Cannot send an empty message")


# ---------------------------------------------------------------- application commands


def _check_name(errors: FormErrors, at: Path, name: Any, lower: bool) -> None:
    """NAMING_DOC: 1-32 characters of the naming pattern; lower case where the script has
    case (chat-input commands and every option)."""
    if not isinstance(name, str) or not COMMAND_NAME.match(name):
        errors.add(
            (*at, "name"),
            "APPLICATION_COMMAND_INVALID_NAME",
            f"Command name is invalid: {name!r}",
        )
    elif lower and name != name.lower():
        errors.add(
            (*at, "name"),
            "APPLICATION_COMMAND_INVALID_NAME",
            f"Command name must be lower case: {name!r}",
        )


def check_options(errors: FormErrors, at: Path, options: list[Json]) -> None:
    """COMMANDS_DOC#application-command-option-structure: up to 25 options with unique
    names and descriptions 1-100; required ones before optional ones; up to 25 choices
    (name 1-100, string value ≤ 100), never together with autocomplete; min/max_length
    0-6000."""
    if len(options) > 25:
        errors.add((*at, "options"), "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")
    names: set[str] = set()
    optional_seen = False
    for i, option in enumerate(options):
        where = (*at, "options", i)
        _check_name(errors, where, option.get("name"), lower=True)
        if option.get("name") in names:
            errors.add(
                (*where, "name"),
                "APPLICATION_COMMAND_OPTIONS_NAME_ALREADY_EXISTS",
                "Option names must be unique",
            )
        names.add(option.get("name"))
        errors.length_between((*where, "description"), option.get("description"), 1, 100, True)
        if option.get("type") in SUBCOMMAND_TYPES:
            check_options(errors, where, option.get("options") or [])
            continue
        if option.get("required"):
            if optional_seen:
                errors.add(
                    (*where, "required"),
                    "APPLICATION_COMMAND_OPTIONS_REQUIRED_INVALID",
                    "Required options must be placed before non-required options",
                )
        else:
            optional_seen = True
        choices = option.get("choices") or []
        if len(choices) > 25:
            errors.add(
                (*where, "choices"), "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length."
            )
        for j, choice in enumerate(choices):
            errors.length_between((*where, "choices", j, "name"), choice.get("name"), 1, 100, True)
            if option.get("type") == STRING_OPTION:
                errors.length_between(
                    (*where, "choices", j, "value"), choice.get("value"), 1, 100, True
                )
        if choices and option.get("autocomplete"):
            errors.add(
                (*where, "autocomplete"),
                "APPLICATION_COMMAND_OPTION_AUTOCOMPLETE_WITH_CHOICES",
                "Autocomplete cannot be set with choices",
            )
        for key in ("min_length", "max_length"):
            value = option.get(key)
            if value is not None and not 0 <= value <= 6000:
                errors.add(
                    (*where, key), "NUMBER_TYPE_MAX", "int value should be between 0 and 6000."
                )


def check_commands(commands: list[Json]) -> None:
    """COMMANDS_DOC (bulk overwrite): up to 100 chat-input commands; names unique per type;
    chat-input names lower case with descriptions 1-100."""
    errors = FormErrors()
    if len([c for c in commands if c.get("type", CHAT_INPUT) == CHAT_INPUT]) > 100:
        errors.add((), "BASE_TYPE_MAX_LENGTH", "Must be 100 or fewer in length.")
    seen: set[tuple[int, str]] = set()
    for i, command in enumerate(commands):
        name, kind = command.get("name", ""), command.get("type", CHAT_INPUT)
        if (kind, name) in seen:
            errors.add(
                (i, "name"),
                "APPLICATION_COMMANDS_DUPLICATE_NAME",
                f"Application command names must be unique: {name!r}",
            )
        seen.add((kind, name))
        _check_name(errors, (i,), name, lower=kind == CHAT_INPUT)
        if kind == CHAT_INPUT:
            errors.length_between((i, "description"), command.get("description"), 1, 100, True)
        check_options(errors, (i,), command.get("options") or [])
    errors.raise_if_any()


# ---------------------------------------------------------------- interaction responses


def check_autocomplete(data: Json) -> None:
    """AUTOCOMPLETE_DOC: up to 25 choices, each name 1-100 and (string) value ≤ 100."""
    errors = FormErrors()
    choices = data.get("choices") or []
    if len(choices) > 25:
        errors.add(("data", "choices"), "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")
    for i, choice in enumerate(choices):
        at = ("data", "choices", i)
        errors.length_between((*at, "name"), choice.get("name"), 1, 100, True)
        if isinstance(choice.get("value"), str):
            errors.max_length((*at, "value"), choice["value"], 100)
    errors.raise_if_any()


def check_text_input(errors: FormErrors, at: Path, text_input: Json) -> None:
    """COMPONENTS_DOC#text-input: style 1-2; label ≤ 45; value ≤ 4000; placeholder ≤ 100;
    min_length 0-4000, max_length 1-4000."""
    errors.one_of((*at, "style"), text_input.get("style"), (1, 2))
    errors.max_length((*at, "label"), text_input.get("label"), 45)
    errors.max_length((*at, "value"), text_input.get("value"), 4000)
    errors.max_length((*at, "placeholder"), text_input.get("placeholder"), 100)
    for key, low in (("min_length", 0), ("max_length", 1)):
        value = text_input.get(key)
        if value is not None and not low <= value <= 4000:
            errors.add(
                (*at, key), "NUMBER_TYPE_MAX", f"int value should be between {low} and 4000."
            )


def check_modal(data: Json) -> None:
    """MODAL_DOC: custom_id 1-100, title 1-45, 1-5 components: action rows holding one
    text input each, or labels wrapping one input."""
    errors = FormErrors()
    errors.length_between(("data", "custom_id"), data.get("custom_id"), 1, 100, True)
    errors.length_between(("data", "title"), data.get("title"), 1, 45, True)
    components = data.get("components") or []
    if not 1 <= len(components) <= 5:
        errors.add(
            ("data", "components"), "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 5 in length."
        )
    for i, component in enumerate(components):
        at = ("data", "components", i)
        if component.get("type") == ACTION_ROW:
            check_action_row(errors, at, component, in_modal=True)
        elif component.get("type") == LABEL:
            errors.length_between((*at, "label"), component.get("label"), 1, 45, True)
            inner = component.get("component")
            if not isinstance(inner, dict):
                errors.add((*at, "component"), "BASE_TYPE_REQUIRED", "This field is required")
            else:
                check_component(errors, (*at, "component"), inner, (TEXT_INPUT, *SELECT_TYPES))
        elif component.get("type") != 10:  # a text display may explain the form
            errors.add((*at, "type"), "COMPONENT_TYPE_INVALID", "Modals hold rows or labels")
    errors.raise_if_any()


# ---------------------------------------------------------------- permissions

# topics/permissions#permissions-bitwise-permission-flags
VIEW_CHANNEL = 1 << 10
SEND_MESSAGES = 1 << 11
EMBED_LINKS = 1 << 14
ATTACH_FILES = 1 << 15
READ_MESSAGE_HISTORY = 1 << 16
SEND_MESSAGES_IN_THREADS = 1 << 38


def check_can_post(permissions: int, *, thread: bool, has_files: bool, has_embeds: bool) -> None:
    """PERMISSIONS_DOC: posting needs View Channel (else 403 / 50001 Missing Access) and
    Send Messages, or Send Messages in Threads in a thread (else 403 / 50013); files need
    Attach Files (50013). Embeds without Embed Links are dropped by Discord, not refused."""
    if not permissions & VIEW_CHANNEL:
        raise DiscordError(403, 50001, "Missing Access")
    send = SEND_MESSAGES_IN_THREADS if thread else SEND_MESSAGES
    if not permissions & send or (has_files and not permissions & ATTACH_FILES):
        raise DiscordError(403, 50013, "Missing Permissions")
    del has_embeds
