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

/// Parse a duration in whole seconds: a number with an s/m/h/d/w suffix
/// ("30d", "12h", "90s"; a bare number is seconds); "0" or "off" is 0.
pub fn parse_duration_secs(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    if t == "off" || t == "never" {
        return Ok(0);
    }
    let num_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if num_end == 0 {
        return Err(format!(
            "{s:?} is not a duration (examples: 30d, 12h, 90m, 0 = off)"
        ));
    }
    let n: u64 = t[..num_end]
        .parse()
        .map_err(|_| format!("{s:?} is too large"))?;
    let mult: u64 = match t[num_end..].trim() {
        "" | "s" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        other => {
            return Err(format!(
                "unknown duration suffix {other:?} in {s:?} (use s, m, h, d or w)"
            ))
        }
    };
    match n.checked_mul(mult) {
        Some(v) if v <= MAX_DURATION_SECS => Ok(v),
        _ => Err(format!("{s:?} is too long (at most 100 years)")),
    }
}

/// Longest duration [`parse_duration_secs`] takes: 100 years.
pub const MAX_DURATION_SECS: u64 = 100 * 366 * 86_400;

#[cfg(test)]
mod duration_tests {
    use super::parse_duration_secs as p;

    #[test]
    fn durations() {
        assert_eq!(p("30d"), Ok(30 * 86_400));
        assert_eq!(p("12h"), Ok(12 * 3600));
        assert_eq!(p("90"), Ok(90));
        assert_eq!(p("5m"), Ok(300));
        assert_eq!(p("off"), Ok(0));
        assert_eq!(p("0"), Ok(0));
        assert!(p("d").is_err());
        assert!(p("3y").is_err());
        assert!(p("99999999999999999999d").is_err());
        assert!(p("18446744073709551615").is_err());
        assert!(p("36500d").is_ok());
    }
}
