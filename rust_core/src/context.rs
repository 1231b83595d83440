//! Context extraction for the batch path: the same rules as `allocsvc.context.extraction`
//! (SPEC §5), limited to what decides segment values. Text follows Python's `str.strip` and
//! `str.lower`, so both paths give the same segment keys.
//!
//! A request that breaks a rule is only flagged here: the Python path words the error.

/// Size limits on a request's raw context (`allocsvc.context.ContextLimits`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextLimits {
    pub max_context_entries: usize,
    pub max_signals: usize,
    pub max_key_chars: usize,
    pub max_value_chars: usize,
    pub max_user_agent_chars: usize,
    pub max_referrer_chars: usize,
}

impl Default for ContextLimits {
    fn default() -> Self {
        ContextLimits {
            max_context_entries: 64,
            max_signals: 64,
            max_key_chars: 64,
            max_value_chars: 256,
            max_user_agent_chars: 1024,
            max_referrer_chars: 2048,
        }
    }
}

pub const UNKNOWN: &str = "unknown";
const DEVICES: [&str; 3] = ["mobile", "desktop", "tablet"];
const HOURS: [&str; 24] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    "17", "18", "19", "20", "21", "22", "23",
];
const MS_PER_DAY: i64 = 86_400_000;
const MS_PER_HOUR: i64 = 3_600_000;
/// 1970-01-01 was a Thursday (Monday = 0).
const EPOCH_WEEKDAY: i64 = 3;

const HOST_SOURCES: [(&str, &str); 17] = [
    ("t.co", "twitter"),
    ("x.com", "twitter"),
    ("fb.com", "facebook"),
    ("fb.me", "facebook"),
    ("lnkd.in", "linkedin"),
    ("youtu.be", "youtube"),
    ("ya.ru", "yandex"),
    ("pin.it", "pinterest"),
    ("redd.it", "reddit"),
    ("mail.google.com", "email"),
    ("com.google.android.gm", "email"),
    ("mail.yahoo.com", "email"),
    ("outlook.live.com", "email"),
    ("outlook.office.com", "email"),
    ("outlook.office365.com", "email"),
    ("mail.yandex.ru", "email"),
    ("mail.proton.me", "email"),
];
const BRAND_LABELS: [&str; 16] = [
    "google",
    "bing",
    "yahoo",
    "duckduckgo",
    "yandex",
    "baidu",
    "ecosia",
    "facebook",
    "instagram",
    "twitter",
    "linkedin",
    "pinterest",
    "reddit",
    "youtube",
    "tiktok",
    "snapchat",
];

/// Python's `str.isspace` for one character (Rust's White_Space plus the separators
/// U+001C..U+001F, which Python also strips).
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

fn py_strip(s: &str) -> &str {
    s.trim_matches(is_py_space)
}

/// Whether `s` has at most `max` characters (a string of at most `max` bytes has).
fn at_most_chars(s: &str, max: usize) -> bool {
    s.len() <= max || s.chars().count() <= max
}

/// `_canonical`: trimmed, lower-cased, the key separators ":" and "|" replaced by "_".
pub fn canonical(value: &str) -> String {
    let value = py_strip(value);
    // Already canonical (the usual case): one copy.
    if value
        .bytes()
        .all(|b| b.is_ascii() && !b.is_ascii_uppercase() && b != b':' && b != b'|')
    {
        return value.to_string();
    }
    value.to_lowercase().replace([':', '|'], "_")
}

/// Where a request's device class comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Device {
    Known(&'static str),
    /// Classified by the Python side (ua-parser), then looked up.
    UserAgent(String),
}

/// The signals learning keeps of a context, in `RawFeatures` order.
pub const LEARNED_SIGNALS: [&str; 4] = [
    "pages_viewed",
    "time_seconds",
    "engagement_score",
    "drop_risk",
];

/// The segment-relevant part of `ExtractedContext`, and the signals learning keeps.
#[derive(Debug, Clone, PartialEq)]
pub struct Extracted {
    pub channel: &'static str,
    pub source: String,
    pub device: Device,
    pub country: String,
    pub hour: usize,
    pub day_of_week: usize,
    pub list_id: String,
    pub campaign_id: String,
    pub funnel_id: String,
    pub current_stage: String,
    /// `LEARNED_SIGNALS` that the channel has and the request gave.
    pub learned: [Option<f64>; 4],
}

/// True for a name `Extracted::dimension` knows.
pub fn is_dimension(name: &str) -> bool {
    matches!(
        name,
        "channel"
            | "source"
            | "device"
            | "country"
            | "hour"
            | "day_of_week"
            | "is_weekend"
            | "list_id"
            | "campaign_id"
            | "funnel_id"
            | "current_stage"
    )
}

impl Extracted {
    /// Segment value of a dimension; "" reads as "unknown". `device` is the resolved class.
    pub fn dimension<'a>(&'a self, name: &str, device: &'a str) -> &'a str {
        let value: &str = match name {
            "channel" => self.channel,
            "source" => &self.source,
            "device" => device,
            "country" => &self.country,
            "hour" => HOURS[self.hour],
            "day_of_week" => HOURS[self.day_of_week],
            "is_weekend" => {
                if self.day_of_week >= 5 {
                    "true"
                } else {
                    "false"
                }
            }
            "list_id" => &self.list_id,
            "campaign_id" => &self.campaign_id,
            "funnel_id" => &self.funnel_id,
            "current_stage" => &self.current_stage,
            _ => "",
        };
        if value.is_empty() {
            UNKNOWN
        } else {
            value
        }
    }
}

fn get<'a>(context: &[(&'a str, &'a str)], key: &str) -> Option<&'a str> {
    context.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
}

/// The rules of `_validate`; `context` and `signals` hold distinct keys.
pub fn valid(context: &[(&str, &str)], signals: &[(&str, f64)], limits: &ContextLimits) -> bool {
    if context.len() > limits.max_context_entries || signals.len() > limits.max_signals {
        return false;
    }
    let key_ok =
        |k: &str| !k.is_empty() && at_most_chars(k, limits.max_key_chars) && !k.contains('\0');
    context.iter().all(|(k, v)| {
        let allowed = match *k {
            "user_agent" => limits.max_user_agent_chars.max(limits.max_value_chars),
            "referrer" => limits.max_referrer_chars.max(limits.max_value_chars),
            _ => limits.max_value_chars,
        };
        key_ok(k) && at_most_chars(v, allowed) && !v.contains('\0')
    }) && signals.iter().all(|(k, x)| key_ok(k) && x.is_finite())
}

fn channel(raw: &str) -> Option<&'static str> {
    let stripped = py_strip(raw);
    if stripped.is_ascii() {
        // ASCII needs no lower-cased copy: `to_lowercase` of ASCII is the ASCII lower case.
        if stripped.is_empty() {
            return Some("web");
        }
        return ["web", "email", "funnel", "push"]
            .into_iter()
            .find(|c| stripped.eq_ignore_ascii_case(c));
    }
    let normalized = stripped.to_lowercase();
    match normalized.as_str() {
        "" | "web" => Some("web"),
        "email" => Some("email"),
        "funnel" => Some("funnel"),
        "push" => Some("push"),
        _ => None,
    }
}

fn country(context: &[(&str, &str)]) -> Option<String> {
    let code = py_strip(get(context, "country_code").unwrap_or(""));
    if code.is_empty() {
        return Some(UNKNOWN.to_string());
    }
    if code.len() == 2 && code.bytes().all(|b| b.is_ascii_alphabetic()) {
        Some(code.to_ascii_lowercase())
    } else {
        None
    }
}

fn device(context: &[(&str, &str)]) -> Option<Device> {
    if let Some(explicit) = get(context, "device").filter(|d| !d.is_empty()) {
        let d = py_strip(explicit).to_lowercase();
        if let Some(known) = DEVICES.iter().find(|k| **k == d) {
            return Some(Device::Known(known));
        }
        if !d.is_empty() {
            return None;
        }
    }
    Some(match get(context, "user_agent").filter(|u| !u.is_empty()) {
        Some(ua) => Device::UserAgent(ua.to_string()),
        None => Device::Known(UNKNOWN),
    })
}

/// `referrer_domain`: the lower-cased host of a referrer URL without "www." and port.
pub fn referrer_domain(referrer: &str) -> String {
    let mut host = py_strip(referrer);
    if let Some(start) = host.find("//") {
        host = &host[start + 2..];
    }
    for sep in ['/', '?', '#'] {
        if let Some(end) = host.find(sep) {
            host = &host[..end];
        }
    }
    if let Some(at) = host.rfind('@') {
        host = &host[at + 1..];
    }
    if host.starts_with('[') {
        // Python's host[: host.find("]") + 1]: without "]" that is the empty string.
        host = host.find(']').map_or("", |end| &host[..=end]);
    } else if let Some(colon) = host.find(':') {
        host = &host[..colon];
    }
    let lowered = host.to_lowercase();
    let mut host = lowered.trim_end_matches('.');
    if let Some(rest) = host.strip_prefix("www.") {
        host = rest;
    }
    host.replace('|', "_")
}

fn host_source(domain: &str) -> Option<&'static str> {
    HOST_SOURCES
        .iter()
        .find(|(h, _)| *h == domain)
        .map(|(_, s)| *s)
}

/// `source_for_domain`: the source a referrer domain names.
pub fn source_for_domain(domain: &str) -> String {
    if domain.is_empty() {
        return "direct".into();
    }
    if let Some(s) = host_source(domain) {
        return s.into();
    }
    let labels: Vec<&str> = domain.split('.').collect();
    for i in 1..labels.len().saturating_sub(1) {
        if let Some(s) = host_source(&labels[i..].join(".")) {
            return s.into();
        }
    }
    for label in &labels[..labels.len() - 1] {
        if BRAND_LABELS.contains(label) {
            return (*label).into();
        }
    }
    "referral".into()
}

/// The hour of the day and the day of the week (Monday = 0) of a request, in UTC: all that
/// extraction reads of its time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clock {
    pub hour: usize,
    pub day_of_week: usize,
}

/// The clock of a request's timestamp (`now_ms` stands for a timestamp of 0); None for a
/// negative timestamp.
pub fn clock(timestamp_ms: i64, now_ms: i64) -> Option<Clock> {
    if timestamp_ms < 0 {
        return None;
    }
    let t = if timestamp_ms == 0 {
        now_ms
    } else {
        timestamp_ms
    };
    let (days, ms_of_day) = (t.div_euclid(MS_PER_DAY), t.rem_euclid(MS_PER_DAY));
    Some(Clock {
        hour: (ms_of_day / MS_PER_HOUR) as usize,
        day_of_week: (days + EPOCH_WEEKDAY).rem_euclid(7) as usize,
    })
}

/// `_extract` for one request; None when the request breaks a rule (timestamp, channel,
/// context limits, device, country). `now_ms` stands for a timestamp of 0.
pub fn extract(
    raw_channel: &str,
    context: &[(&str, &str)],
    signals: &[(&str, f64)],
    timestamp_ms: i64,
    now_ms: i64,
    limits: &ContextLimits,
) -> Option<Extracted> {
    extract_at(
        raw_channel,
        context,
        signals,
        clock(timestamp_ms, now_ms)?,
        limits,
    )
}

/// [`extract`] once the timestamp is read: the result depends on the time only through `clock`.
pub fn extract_at(
    raw_channel: &str,
    context: &[(&str, &str)],
    signals: &[(&str, f64)],
    clock: Clock,
    limits: &ContextLimits,
) -> Option<Extracted> {
    let channel = channel(raw_channel)?;
    if !valid(context, signals, limits) {
        return None;
    }
    let Clock { hour, day_of_week } = clock;
    let device = device(context)?;
    let country = country(context)?;
    let field = |k: &str| canonical(get(context, k).unwrap_or(""));
    let mut out = Extracted {
        channel,
        source: String::new(),
        device,
        country,
        hour,
        day_of_week,
        list_id: String::new(),
        campaign_id: String::new(),
        funnel_id: String::new(),
        current_stage: String::new(),
        learned: [None; 4],
    };
    // The channel's own signals (`_extract`): web pages_viewed and time_seconds, email and
    // push engagement_score, funnel drop_risk.
    let learned: &[usize] = match channel {
        "web" => &[0, 1],
        "funnel" => &[3],
        _ => &[2],
    };
    for &k in learned {
        out.learned[k] = signals
            .iter()
            .find(|(name, _)| *name == LEARNED_SIGNALS[k])
            .map(|(_, v)| *v);
    }
    match channel {
        "web" => {
            let domain = get(context, "referrer")
                .filter(|r| !r.is_empty())
                .map(referrer_domain)
                .unwrap_or_default();
            out.source = field("utm_source");
            if out.source.is_empty() {
                out.source = source_for_domain(&domain);
            }
        }
        "email" => {
            out.source = "email".into();
            out.list_id = field("list_id");
            out.campaign_id = field("campaign_id");
        }
        "funnel" => {
            out.funnel_id = field("funnel_id");
            out.source = if out.funnel_id.is_empty() {
                "funnel".into()
            } else {
                format!("funnel_{}", out.funnel_id)
            };
            out.current_stage = field("current_stage");
        }
        _ => {
            out.source = "push".into();
            out.campaign_id = field("campaign_id");
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web(pairs: &[(&str, &str)]) -> Option<Extracted> {
        extract(
            "",
            pairs,
            &[],
            1_700_000_000_000,
            0,
            &ContextLimits::default(),
        )
    }

    #[test]
    fn web_source_comes_from_utm_then_referrer() {
        assert_eq!(
            web(&[("utm_source", " Insta:Gram ")]).unwrap().source,
            "insta_gram"
        );
        let from_referrer = web(&[("referrer", "https://www.Google.co.uk/search?q=1")]).unwrap();
        assert_eq!(from_referrer.source, "google");
        assert_eq!(
            web(&[("referrer", "https://t.co/x")]).unwrap().source,
            "twitter"
        );
        assert_eq!(
            web(&[("referrer", "https://mail.google.com/")])
                .unwrap()
                .source,
            "email"
        );
        assert_eq!(
            web(&[("referrer", "example.org")]).unwrap().source,
            "referral"
        );
        assert_eq!(web(&[]).unwrap().source, "direct");
    }

    #[test]
    fn time_country_and_device() {
        // 2023-11-14 22:13:20 UTC, a Tuesday.
        let e = web(&[("country_code", " US"), ("device", "Tablet")]).unwrap();
        assert_eq!((e.hour, e.day_of_week), (22, 1));
        assert_eq!(e.dimension("is_weekend", "x"), "false");
        assert_eq!(e.country, "us");
        assert_eq!(e.device, Device::Known("tablet"));
        assert_eq!(
            web(&[("user_agent", "Mozilla")]).unwrap().device,
            Device::UserAgent("Mozilla".into())
        );
        assert_eq!(e.dimension("list_id", "x"), UNKNOWN);
        assert!(web(&[("country_code", "USA")]).is_none());
        assert!(web(&[("device", "phone")]).is_none());
    }

    #[test]
    fn channels_and_limits() {
        let limits = ContextLimits::default();
        let f = extract(
            " Funnel ",
            &[("funnel_id", "Checkout"), ("current_stage", "Pay")],
            &[],
            5,
            0,
            &limits,
        )
        .unwrap();
        assert_eq!(
            (f.channel, f.source.as_str()),
            ("funnel", "funnel_checkout")
        );
        assert!(extract("fax", &[], &[], 0, 0, &limits).is_none());
        assert!(extract("", &[], &[], -1, 0, &limits).is_none());
        assert!(web(&[("utm_source", &"y".repeat(300))]).is_none());
        assert!(web(&[("user_agent", &"y".repeat(300))]).is_some());
        assert!(web(&[("a\0", "b")]).is_none());
        let nan = [("x", f64::NAN)];
        assert!(extract("", &[], &nan, 0, 0, &limits).is_none());
    }

    #[test]
    fn fast_paths_give_what_lower_casing_gives() {
        for raw in [
            "",
            " ",
            "web",
            " PUSH ",
            "Email\t",
            "fUnNeL",
            "fax",
            "w\u{e9}b",
            "\u{212a}",
            "\u{ff57}eb",
        ] {
            let lowered = py_strip(raw).to_lowercase();
            let slow = match lowered.as_str() {
                "" | "web" => Some("web"),
                "email" => Some("email"),
                "funnel" => Some("funnel"),
                "push" => Some("push"),
                _ => None,
            };
            assert_eq!(channel(raw), slow, "{raw:?}");
        }
        for raw in [
            "x",
            " a:b|c ",
            "Insta",
            "\u{130}stanbul",
            "already_canonical",
            "\u{1c}q",
        ] {
            let slow = py_strip(raw).to_lowercase().replace([':', '|'], "_");
            assert_eq!(canonical(raw), slow, "{raw:?}");
        }
        assert!(at_most_chars("\u{e9}\u{e9}", 2) && !at_most_chars("\u{e9}\u{e9}\u{e9}", 2));
    }

    #[test]
    fn referrer_domains_like_python() {
        assert_eq!(
            referrer_domain("https://user@WWW.Example.com:8080/x"),
            "example.com"
        );
        assert_eq!(referrer_domain("[::1"), "");
        assert_eq!(referrer_domain("//[::1]:80/"), "[::1]");
        assert_eq!(referrer_domain("a|b.com."), "a_b.com");
    }
}
