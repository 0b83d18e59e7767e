//! The overview's changes per day: opt-outs and opt-ins over the last 90
//! days, counted from the audit log, drawn as a server-rendered SVG bar
//! chart with the same figures in a table beside it (the table is what a
//! screen reader reads; the chart is marked as an image with a summary).

use std::collections::BTreeMap;
use std::fmt::Write;

use super::audit::seq_before;
use crate::domain::{Event, Micros, Status};
use crate::store::{Store, StoreError};

/// Days shown.
pub const DAYS: usize = 90;
const DAY_MICROS: i64 = 86_400_000_000;

/// One day's figures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Day {
    /// `YYYY-MM-DD` (UTC).
    pub date: String,
    /// Changes to opted out.
    pub opt_outs: u64,
    /// Changes to opted in.
    pub opt_ins: u64,
}

/// Opt-outs and opt-ins per UTC day, kept between requests, so each
/// overview reads only the audit entries appended since the last one (the
/// first reads the whole 90 days). Entries are appended in time order and
/// never change their status or date, so counts once made stay right.
#[derive(Debug, Default)]
pub struct Tally {
    /// Entries up to this sequence number are counted.
    counted_to: u64,
    /// Day (days since the epoch) → (opt-outs, opt-ins).
    days: BTreeMap<i64, (u64, u64)>,
}

impl Tally {
    /// Counts the entries appended since the last call and returns the last
    /// [`DAYS`] UTC days up to and including `now`'s, oldest first.
    pub fn update(&mut self, store: &Store, now: Micros, last: u64) -> Result<Vec<Day>, StoreError> {
        let today = now.0.div_euclid(DAY_MICROS);
        let first = today - DAYS as i64 + 1;
        let mut after = self.counted_to.max(seq_before(store, Micros(first * DAY_MICROS), last)?);
        loop {
            let chunk = store.events_after(after, 4096)?;
            let Some((tail, _)) = chunk.last() else { break };
            after = *tail;
            for (_, e) in chunk {
                let Event::Preference(c) = e else { continue };
                let day = c.at.0.div_euclid(DAY_MICROS);
                if day >= first {
                    let counts = self.days.entry(day).or_default();
                    match c.after {
                        Status::OptedOut => counts.0 += 1,
                        Status::OptedIn => counts.1 += 1,
                    }
                }
            }
        }
        self.counted_to = after;
        self.days.retain(|d, _| *d >= first);
        Ok((first..=today)
            .map(|day| {
                let date = jiff::Timestamp::from_microsecond(day * DAY_MICROS).map_or_else(
                    |_| "invalid".to_owned(),
                    |t| t.to_zoned_datetime(jiff::tz::TimeZone::UTC).date().to_string(),
                );
                let (opt_outs, opt_ins) = self.days.get(&day).copied().unwrap_or_default();
                Day { date, opt_outs, opt_ins }
            })
            .collect())
    }
}

/// The chart and its table.
pub fn render(days: &[Day]) -> String {
    let max = days.iter().map(|d| d.opt_outs.max(d.opt_ins)).max().unwrap_or(0).max(1);
    let (outs, ins): (u64, u64) = days.iter().fold((0, 0), |(o, i), d| (o + d.opt_outs, i + d.opt_ins));
    let (w, h, bar) = (6 * days.len() + 40, 160usize, 2usize);
    let mut b = String::new();
    let _ = write!(
        b,
        "<h2 id=\"per-day\">Changes per day, last {DAYS} days</h2>\
         <p>Red bars: opt-outs; green bars: opt-ins. The table gives the same figures.</p><div class=\"pair\">\
         <svg role=\"img\" aria-labelledby=\"chart-title\" viewBox=\"0 0 {w} {}\" width=\"{w}\" height=\"{}\" \
         xmlns=\"http://www.w3.org/2000/svg\"><title id=\"chart-title\">Opt-outs (red) and opt-ins (green) per day: \
         {outs} opt-outs and {ins} opt-ins in {DAYS} days, at most {max} on one day</title>\
         <line x1=\"30\" y1=\"{h}\" x2=\"{w}\" y2=\"{h}\" stroke=\"#595959\"/>\
         <text x=\"0\" y=\"12\" font-size=\"10\">{max}</text><text x=\"0\" y=\"{h}\" font-size=\"10\">0</text>",
        h + 20,
        h + 20
    );
    for (i, d) in days.iter().enumerate() {
        let x = 32 + i * 6;
        for (n, dx, color) in [(d.opt_outs, 0, "#8a1c1c"), (d.opt_ins, bar, "#1d5e20")] {
            let bh = (n as usize * (h - 10)).div_ceil(max as usize);
            if bh > 0 {
                let _ = write!(
                    b,
                    "<rect x=\"{}\" y=\"{}\" width=\"{bar}\" height=\"{bh}\" fill=\"{color}\"/>",
                    x + dx,
                    h - bh
                );
            }
        }
    }
    if let (Some(first), Some(last)) = (days.first(), days.last()) {
        let _ = write!(
            b,
            "<text x=\"32\" y=\"{}\" font-size=\"10\">{}</text><text x=\"{}\" y=\"{}\" font-size=\"10\" text-anchor=\"end\">{}</text>",
            h + 14,
            first.date,
            w,
            h + 14,
            last.date
        );
    }
    b.push_str("</svg>");
    b.push_str(
        "<table aria-labelledby=\"per-day\"><thead><tr><th scope=\"col\">Day (UTC)</th><th scope=\"col\">Opt-outs</th>\
         <th scope=\"col\">Opt-ins</th></tr></thead><tbody>",
    );
    for d in days.iter().rev() {
        let _ = write!(
            b,
            "<tr><th scope=\"row\">{}</th><td>{}</td><td>{}</td></tr>",
            d.date, d.opt_outs, d.opt_ins
        );
    }
    b.push_str("</tbody></table></div>");
    b
}
