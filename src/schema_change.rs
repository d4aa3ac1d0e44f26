//! Which statements may change the shape of what prepared statements read: after one,
//! statements prepared before it can fail ("cached plan must not change result type")
//! or point at a table that is gone, so the engine's statement caches are renewed.

/// The first words of statements that change the schema, or drop server-side prepared
/// statements.
const CHANGING: [&str; 5] = ["alter", "create", "deallocate", "discard", "drop"];

/// Whether the one statement `sql` may change the schema (its first word, after
/// blanks and comments). Cheap: it reads a few bytes of an ordinary query.
pub(crate) fn statement_changes_schema(sql: &str) -> bool {
    // Most statements are told apart by their first byte (SELECT, INSERT, UPDATE, …).
    if !matches!(
        sql.trim_ascii_start().as_bytes().first(),
        Some(b'a' | b'A' | b'c' | b'C' | b'd' | b'D' | b'-' | b'/')
    ) {
        return false;
    }
    let word = first_word(sql);
    CHANGING
        .iter()
        .any(|changing| word.eq_ignore_ascii_case(changing))
}

/// Whether any statement of `sql` (several separated by `;`, as the simple protocol
/// takes them) may change the schema. A `;` inside a literal only adds a fragment to
/// look at: at worst a cache is renewed for nothing.
pub(crate) fn changes_schema(sql: &str) -> bool {
    match memchr::memchr(b';', sql.as_bytes()) {
        None => statement_changes_schema(sql), // one statement (BEGIN, COMMIT, …)
        Some(_) => sql.split(';').any(statement_changes_schema),
    }
}

/// The first word of `sql`, after blanks, `--` line comments and `/* */` comments.
pub(crate) fn first_word(mut sql: &str) -> &str {
    loop {
        sql = sql.trim_start();
        if let Some(rest) = sql.strip_prefix("--") {
            sql = rest.split_once('\n').map_or("", |(_, after)| after);
        } else if let Some(rest) = sql.strip_prefix("/*") {
            sql = after_block_comment(rest);
        } else {
            break;
        }
    }
    let end = sql
        .find(|c: char| !c.is_ascii_alphabetic())
        .unwrap_or(sql.len());
    &sql[..end]
}

/// What follows a block comment, `rest` being what follows its `/*`: comments nest in
/// PostgreSQL, so `/* a /* b */ c */` is one. Empty when it never closes.
fn after_block_comment(mut rest: &str) -> &str {
    let mut depth = 1;
    while depth > 0 {
        let Some(at) = rest.find(['/', '*']) else {
            return "";
        };
        rest = &rest[at..];
        if let Some(after) = rest.strip_prefix("/*") {
            depth += 1;
            rest = after;
        } else if let Some(after) = rest.strip_prefix("*/") {
            depth -= 1;
            rest = after;
        } else {
            rest = &rest[1..];
        }
    }
    rest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_ddl_after_blanks_and_comments() {
        assert!(statement_changes_schema(
            "ALTER TABLE band ADD COLUMN x int"
        ));
        assert!(statement_changes_schema(
            "  -- note\n /* x */ drop table band"
        ));
        assert!(statement_changes_schema("DISCARD ALL"));
        assert!(!statement_changes_schema("SELECT * FROM band"));
        assert!(!statement_changes_schema("INSERT INTO created VALUES (1)"));
        assert!(!statement_changes_schema("-- only a comment"));
        assert!(changes_schema("SELECT 1; CREATE INDEX ON band (name)"));
        assert!(!changes_schema("SELECT 1; UPDATE band SET name = 'x'"));
    }
}
