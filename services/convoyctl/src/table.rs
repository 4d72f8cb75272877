//! Plain-text tables: columns as wide as their widest cell, two spaces apart.

/// `header` and `rows` as aligned lines, without trailing spaces.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let line = |row: &mut dyn Iterator<Item = &str>| {
        let mut text: String = row
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:width$}  "))
            .collect();
        text.truncate(text.trim_end().len());
        text.push('\n');
        text
    };
    let mut out = line(&mut header.iter().copied());
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}
