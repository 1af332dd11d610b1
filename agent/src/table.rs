//! The CLI's one table renderer (kubectl's look): upper-case headers, columns as wide
//! as their widest cell, three spaces between, numbers right-aligned.

use comfy_table::{presets, CellAlignment, ColumnConstraint, ContentArrangement, Width};

/// How a column's cells line up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

pub struct Table {
    columns: Vec<(String, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new<S: Into<String>>(columns: impl IntoIterator<Item = (S, Align)>) -> Table {
        Table {
            columns: columns.into_iter().map(|(h, a)| (h.into(), a)).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are empty, extra ones dropped.
    pub fn row(&mut self, mut cells: Vec<String>) {
        cells.resize(self.columns.len(), String::new());
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let mut t = comfy_table::Table::new();
        t.load_preset(presets::NOTHING)
            // Never wrapped or cut, whatever the terminal: a name is read whole.
            .set_content_arrangement(ContentArrangement::Disabled)
            .set_header(self.columns.iter().map(|(h, _)| h.clone()));
        for r in &self.rows {
            t.add_row(r.clone());
        }
        let last = self.columns.len().saturating_sub(1);
        for (i, (_, align)) in self.columns.iter().enumerate() {
            if let Some(c) = t.column_mut(i) {
                c.set_padding((0, if i == last { 0 } else { 3 }));
                c.set_cell_alignment(match align {
                    Align::Left => CellAlignment::Left,
                    Align::Right => CellAlignment::Right,
                });
                c.set_constraint(ColumnConstraint::LowerBoundary(Width::Fixed(1)));
            }
        }
        let mut out: String = t.lines().map(|l| l.trim_end().to_string() + "\n").collect();
        if self.rows.is_empty() {
            out = t
                .lines()
                .next()
                .map(|l| l.trim_end().to_string() + "\n")
                .unwrap_or_default();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_fit_their_widest_cell() {
        let mut t = Table::new([
            ("POD", Align::Left),
            ("IPS", Align::Left),
            ("PKTS", Align::Right),
        ]);
        let long = "a".repeat(63) + "/" + &"p".repeat(120);
        t.row(vec![
            long.clone(),
            "fd00:1234:5678:9abc:def0:1234:5678:9abc".into(),
            "7".into(),
        ]);
        t.row(vec!["ns/p".into(), "10.0.0.1".into(), "123456".into()]);
        let out = t.render();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        // Every column starts at the same offset on every line, and nothing is cut.
        let col = |l: &str, i: usize| l.match_indices("   ").count() >= i;
        assert!(lines.iter().all(|l| col(l, 2)), "{out}");
        assert!(lines[1].starts_with(&long), "{out}");
        let ips_at = lines[0].find("IPS").unwrap();
        assert_eq!(lines[1].find("fd00").unwrap(), ips_at, "{out}");
        assert_eq!(lines[2].find("10.0.0.1").unwrap(), ips_at, "{out}");
        assert!(
            lines[1].ends_with("     7") && lines[2].ends_with("123456"),
            "{out}"
        );
        assert_eq!(Table::new([("A", Align::Left)]).render(), "A\n");
    }
}
