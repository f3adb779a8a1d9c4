//! Just enough CSV for track files: comma-separated fields, optionally double-quoted (with `""`
//! for a quote inside), one record per line. IBTrACS, the synthetic truth and our own output all
//! stay within that, and owning the parser lets every error name its line.

/// Splits one line into trimmed fields; `Err` says what is wrong with it.
pub(crate) fn split_line(line: &str) -> Result<Vec<String>, String> {
    let line = line.strip_suffix('\r').unwrap_or(line);
    let mut fields = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        let mut field = String::new();
        // Skip blanks before a possible opening quote.
        while chars.peek() == Some(&' ') {
            chars.next();
        }
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    Some('"') => break,
                    Some(c) => field.push(c),
                    None => return Err("a quoted field is not closed".into()),
                }
            }
            while chars.peek() == Some(&' ') {
                chars.next();
            }
            match chars.next() {
                None => {
                    fields.push(field);
                    return Ok(fields);
                }
                Some(',') => fields.push(field),
                Some(c) => return Err(format!("`{c}` after a closing quote")),
            }
        } else {
            loop {
                match chars.next() {
                    None => {
                        fields.push(field.trim().to_string());
                        return Ok(fields);
                    }
                    Some(',') => break,
                    Some(c) => field.push(c),
                }
            }
            fields.push(field.trim().to_string());
        }
    }
}

/// Quotes `field` when it needs it.
pub(crate) fn quote(field: &str) -> String {
    if field.contains([',', '"', '\n']) {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_plain_quoted_and_blank_fields() {
        assert_eq!(split_line("a, b ,,c").unwrap(), vec!["a", "b", "", "c"]);
        assert_eq!(
            split_line("\"x, y\",\"say \"\"hi\"\"\", z\r").unwrap(),
            vec!["x, y", "say \"hi\"", "z"]
        );
        assert_eq!(split_line("").unwrap(), vec![""]);
        assert_eq!(split_line("a,").unwrap(), vec!["a", ""]);
        assert!(split_line("\"open").is_err());
        assert!(split_line("\"a\"b,c").is_err());
        assert_eq!(split_line(&quote("p,q")).unwrap(), vec!["p,q"]);
        assert_eq!(quote("plain"), "plain");
    }
}
