//! Who is in the room, kept sorted as members come, go and rename, with the `/who` answer
//! rendered once per change: a flood of `/who` costs a shared buffer per answer, never a
//! copy and sort of everyone.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{WHO_LISTED, text};

/// The room's names, sorted, and the `/who` answer they make.
#[derive(Debug, Default)]
pub struct Roster {
    /// Name → how many hold it (a name held twice is briefly possible across a reload).
    names: BTreeMap<String, usize>,
    total: usize,
    answer: Option<Arc<[u8]>>,
}

impl Roster {
    /// Someone named `name` is here.
    pub fn add(&mut self, name: &str) {
        *self.names.entry(name.to_string()).or_default() += 1;
        self.total += 1;
        self.answer = None;
    }

    /// Someone named `name` is gone.
    pub fn remove(&mut self, name: &str) {
        if let Some(n) = self.names.get_mut(name) {
            *n -= 1;
            if *n == 0 {
                self.names.remove(name);
            }
            self.total -= 1;
            self.answer = None;
        }
    }

    /// `old` is now `new`.
    pub fn rename(&mut self, old: &str, new: &str) {
        self.remove(old);
        self.add(new);
    }

    /// The `/who` answer: how many, and the first names in order.
    pub fn who(&mut self) -> Arc<[u8]> {
        let (names, total) = (&self.names, self.total);
        Arc::clone(self.answer.get_or_insert_with(|| {
            let listed: Vec<&str> = names
                .iter()
                .flat_map(|(n, &k)| std::iter::repeat_n(n.as_str(), k))
                .take(WHO_LISTED)
                .collect();
            let more = total.saturating_sub(listed.len());
            let tail = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            text(format!(
                "* {total} connected: {}{tail}\n",
                listed.join(", ")
            ))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(r: &mut Roster) -> String {
        String::from_utf8(r.who().to_vec()).unwrap()
    }

    #[test]
    fn the_answer_is_sorted_capped_and_follows_every_change() {
        let mut r = Roster::default();
        for i in (0..60).rev() {
            r.add(&format!("u{i:02}"));
        }
        let first = r.who();
        assert!(
            Arc::ptr_eq(&first, &r.who()),
            "rendered again without a change"
        );
        let w = who(&mut r);
        assert!(w.starts_with("* 60 connected: u00, u01,"), "{w}");
        assert!(w.ends_with("u49 and 10 more\n"), "{w}");
        r.rename("u00", "zz");
        r.remove("u01");
        r.remove("nobody");
        assert!(who(&mut r).starts_with("* 59 connected: u02, u03,"));
        let mut r = Roster::default();
        r.add("b");
        r.add("a");
        r.add("b");
        assert_eq!(who(&mut r), "* 3 connected: a, b, b\n");
    }
}
