//! Aligned columns for the client commands' human output.

/// Prints `rows` under `header`, each column as wide as its widest cell, two spaces
/// apart; the last column is not padded.
pub fn print(header: &[&str], rows: &[Vec<String>]) {
    print!("{}", render(header, rows));
}

pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// `-` for nothing, so every column has a cell.
pub fn or_dash(s: Option<impl ToString>) -> String {
    s.map(|s| s.to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "-".into())
}

#[cfg(test)]
mod tests {
    #[test]
    fn columns_line_up() {
        let out = super::render(
            &["NAME", "MODE", "TAPS"],
            &[
                vec!["shared".into(), "shared".into(), "2".into()],
                vec!["a-long-name".into(), "host".into(), "0".into()],
            ],
        );
        assert_eq!(
            out,
            "NAME         MODE    TAPS\nshared       shared  2\na-long-name  host    0\n"
        );
    }
}
