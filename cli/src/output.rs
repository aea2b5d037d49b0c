//! `-o json|yaml`, as kubectl prints objects: the same data the text shows, for scripts.

use serde::Serialize;

/// Output format of a command that also prints text for people.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// For people (the default).
    #[default]
    Text,
    Json,
    Yaml,
}

impl Format {
    pub fn is_text(self) -> bool {
        self == Self::Text
    }

    /// Prints `value` as JSON or YAML on stdout; nothing for Text.
    pub fn print<T: Serialize>(self, value: &T) -> Result<(), String> {
        match self {
            Self::Text => {}
            Self::Json => println!("{}", serde_json::to_string_pretty(value).map_err(|e| e.to_string())?),
            Self::Yaml => print!("{}", serde_saphyr::to_string(value).map_err(|e| e.to_string())?),
        }
        Ok(())
    }
}
