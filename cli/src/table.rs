//! Plain-text tables with aligned columns.

/// Renders rows under a header, each column as wide as its widest cell; columns whose
/// `right_align` flag is set are right-aligned (numbers).
pub fn render(header: &[&str], right_align: &[bool], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| -> String {
        let padded: Vec<String> = cells
            .zip(&widths)
            .zip(right_align)
            .map(
                |((cell, &w), &right)| {
                    if right { format!("{cell:>w$}") } else { format!("{cell:<w$}") }
                },
            )
            .collect();
        padded.join("  ").trim_end().to_owned()
    };
    let mut out = line(&mut header.iter().copied());
    out.push('\n');
    let rule: Vec<String> = widths.iter().map(|&w| "─".repeat(w)).collect();
    out.push_str(&rule.join("  "));
    out.push('\n');
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
        out.push('\n');
    }
    out
}

/// Bytes in binary units: `512 B`, `2.2 KiB`, `9.0 MiB`, `1.5 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

/// A count with an SI suffix: `950`, `33.6 M`, `1.2 G`.
pub fn si(n: f64) -> String {
    const UNITS: [&str; 5] = ["", " k", " M", " G", " T"];
    let mut value = n;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 { format!("{value:.0}") } else { format!("{value:.1}{}", UNITS[unit]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(2304), "2.2 KiB");
        assert_eq!(bytes(9 * 1024 * 1024), "9.0 MiB");
        assert_eq!(si(950.0), "950");
        assert_eq!(si(33_554_432.0), "33.6 M");
    }

    #[test]
    fn aligned_columns() {
        let text = render(&["a", "n"], &[false, true], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(text, "a    n\n───  ─\nxyz  1\n");
    }
}
