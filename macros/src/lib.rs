//! Procedural macros of temper (the DSL lands with the DSL issue).
