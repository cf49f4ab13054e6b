"""The few sentences the server says in the visitor's language, in one place (a later issue brings full i18n).

Each language detection can name (see `server/chat/language.py`) has its English name, for the model's
instruction ("Answer in Spanish."), and the note that starts an offline answer: the knowledge base answers in
English, and a person can help in the visitor's language.
"""

from __future__ import annotations

LANGUAGE_NAMES: dict[str, str] = {
    "en": "English",
    "es": "Spanish",
    "de": "German",
    "fr": "French",
    "it": "Italian",
    "pt": "Portuguese",
    "nl": "Dutch",
}

OFFLINE_NOTES: dict[str, str] = {
    "es": (
        "Nuestro asistente sin conexión solo responde en inglés. Si prefiere hablar en español, pulse "
        "«Hablar con una persona» y un miembro de nuestro equipo le atenderá."
    ),
    "de": (
        "Unser Offline-Assistent antwortet nur auf Englisch. Wenn Sie lieber Deutsch sprechen, klicken Sie auf "
        "„Mit einer Person sprechen“, und jemand aus unserem Team hilft Ihnen weiter."
    ),
    "fr": (
        "Notre assistant hors ligne ne répond qu'en anglais. Si vous préférez le français, cliquez sur "
        "« Parler à une personne » et un membre de notre équipe vous aidera."
    ),
    "it": (
        "Il nostro assistente offline risponde solo in inglese. Se preferisce l'italiano, clicchi su "
        "«Parla con una persona» e un membro del nostro team la aiuterà."
    ),
    "pt": (
        "O nosso assistente offline só responde em inglês. Se preferir português, clique em "
        "«Falar com uma pessoa» e alguém da nossa equipa vai ajudar."
    ),
    "nl": (
        "Onze offline assistent antwoordt alleen in het Engels. Spreekt u liever Nederlands, klik dan op "
        "„Met een persoon praten” en iemand van ons team helpt u verder."
    ),
}


def language_name(code: str) -> str | None:
    """The English name of a language code, None for one we have no name for."""
    return LANGUAGE_NAMES.get(code)


def answer_in(code: str | None) -> str | None:
    """The model's instruction to answer in the visitor's language (None for English, unknown or no language)."""
    name = LANGUAGE_NAMES.get(code or "")
    if name is None or code == "en":
        return None
    return f"The visitor writes in {name}. Answer in {name}."


def offline_note(code: str | None) -> str | None:
    """What starts an offline (English) answer for a visitor writing another language; None when none is needed."""
    return OFFLINE_NOTES.get(code or "")
