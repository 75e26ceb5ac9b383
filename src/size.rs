//! Human-readable sizes ("256M", "1G", "4096") for the command line.

/// Parse bytes with an optional K/M/G/T suffix (binary units, optional "iB"/"B").
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let num_end = lower
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(lower.len());
    if num_end == 0 {
        return Err(format!("{s:?} is not a size (examples: 4096, 256M, 1G)"));
    }
    let n: u64 = lower[..num_end]
        .parse()
        .map_err(|_| format!("{s:?} is too large"))?;
    // A fraction ("1.5G") is taken when it comes to whole bytes.
    let (frac, rest) = match lower[num_end..].strip_prefix('.') {
        Some(r) => {
            let e = r.find(|c: char| !c.is_ascii_digit()).unwrap_or(r.len());
            if e == 0 || e > 12 {
                return Err(format!("{s:?} is not a size (examples: 4096, 256M, 1.5G)"));
            }
            (Some(&r[..e]), &r[e..])
        }
        None => (None, &lower[num_end..]),
    };
    let mult: u64 = match rest.trim() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => {
            return Err(format!(
                "unknown size suffix {other:?} in {s:?} (use K, M, G or T)"
            ))
        }
    };
    let whole = n
        .checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))?;
    let Some(frac) = frac else {
        return Ok(whole);
    };
    // frac / 10^digits of `mult`, exactly.
    let den = 10u128.pow(frac.len() as u32);
    let num = frac.parse::<u128>().unwrap_or(0) * mult as u128;
    if !num.is_multiple_of(den) {
        return Err(format!(
            "{s:?} is not a whole number of bytes; give it in a smaller unit"
        ));
    }
    whole
        .checked_add((num / den) as u64)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn parses_suffixes_and_rejects_garbage() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert!(parse_size("x").is_err());
        assert!(parse_size("1Q").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("0.25k").unwrap(), 256);
        assert!(parse_size("1.1").is_err(), "a fraction of a byte");
        assert!(parse_size("1.").is_err());
        assert!(parse_size("1.5X").is_err());
    }
}
