//! Reading the crate's TOML files (model, training and ablation configs): one place that reads
//! the file, parses it relative to its folder and names the file in what goes wrong.

use std::path::Path;

use crate::error::{Error, Result, io_err};

/// Reads the file at `path` and parses its text with `parse`, which gets the file's folder to
/// resolve the paths the file names. A read error names the file, and so do the parser's errors
/// about settings and syntax.
pub(crate) fn read_toml<T>(
    path: &Path,
    parse: impl FnOnce(&str, Option<&Path>) -> Result<T>,
) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    parse(&text, path.parent()).map_err(|e| match e {
        Error::TrainConfig { setting, reason } => Error::TrainConfig {
            setting,
            reason: format!("{reason} (in {})", path.display()),
        },
        Error::ConfigFile { source, .. } => Error::ConfigFile {
            path: path.display().to_string(),
            source,
        },
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::train_config_err;

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.toml");
        let missing = read_toml(&path, |_, _| Ok(())).unwrap_err();
        assert!(matches!(missing, Error::Io { .. }), "{missing}");
        assert!(missing.to_string().contains("x.toml"), "{missing}");

        std::fs::write(&path, "a = 1").unwrap();
        let folder = read_toml(&path, |text, dir| {
            assert_eq!(text, "a = 1");
            Ok(dir.map(Path::to_path_buf))
        })
        .unwrap();
        assert_eq!(folder.as_deref(), Some(dir.path()));

        let e = read_toml::<()>(&path, |_, _| Err(train_config_err("steps", "must be 1")))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("steps") && e.contains(&path.display().to_string()),
            "{e}"
        );
        let e = read_toml(&path, |text, _| {
            toml::from_str::<crate::ModelConfig>(text).map_err(|e| Error::ConfigFile {
                path: "<string>".into(),
                source: Box::new(e),
            })
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");
    }
}
