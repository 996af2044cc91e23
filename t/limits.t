#!/usr/bin/perl
# Per-route limits under 4 workers: max_conns admits exactly that many open connections of a
# route (40 clients at once), max_conns_per_client that many per client address, a rate with
# a burst admits rate x seconds + burst + 1 over 10 s; allow and deny lists by client network;
# an upstream's limits for the routes that send to it; a connection refused by a later limit
# gives back what an earlier one took. Refused HTTP clients get 429 or 403 with a one-line
# body, refused TLS clients a closed connection; refusals are counted per route and reason and
# logged at most once per 10 s per worker and reason; a table swap that changes a limit applies
# it to new connections; a bad limit is refused with its JSON path.

use strict;
use warnings;
use Test::More;
use JSON::PP;
use IO::Socket::INET;
use IO::Select;
use Time::HiRes qw(time);
use Edge::Test qw(client_hello tls_records http_get raw_exchange wait_for);

my $t = Edge::Test->new;

sub table {
    my (%o) = @_;
    return encode_json({
        upstreams => {
            # Answers each connection at once and keeps it open.
            held => { servers => ['127.0.0.1:' . $t->port('held')] },
            web => { servers => ['127.0.0.1:' . $t->port('web')] },
            guarded => { servers => ['127.0.0.1:' . $t->port('web')],
                         limits => { deny => ['127.0.0.0/8'] } },
        },
        routes => {
            'max.test' => { upstream => 'held', limits => { max_conns => $o{max} // 10 } },
            'per.test' => { upstream => 'held', limits => { max_conns_per_client => 2 } },
            'rate.test' => { upstream => 'web', limits => { rate => '50r/s', burst => 10 } },
            'acl.test' => { upstream => 'web',
                            limits => { allow => ['127.0.0.2', '127.0.0.128/25'], deny => ['127.0.0.200'] } },
            'guarded.test' => 'guarded',
            # The route's own deny list replaces its upstream's.
            'open.test' => { upstream => 'guarded', limits => { deny => ['10.0.0.0/8'] } },
            'free.test' => 'web',
            'tlsacl.test' => { upstream => 'held', limits => { deny => ['127.0.0.1'] } },
            # Per client, then a rate that refuses the second connection: its pair goes back.
            'both.test' => { upstream => 'held', limits => { max_conns_per_client => 5, rate => '1r/m' } },
        },
    });
}
$t->write_routes('routes.json', table());
$t->config(<<"EOF", workers => 4, connections => 4096);
    edge_routes %%TESTDIR%%/routes.json interval=100ms;
    edge_counters routes=1000 unrouted=10 clients=100;
    server { listen 127.0.0.1:%%PORT_http%% reuseport; edge_route http; proxy_pass \$edge_upstream; }
    server { listen 127.0.0.1:%%PORT_tls%% reuseport; edge_route tls; proxy_pass \$edge_upstream; }
    server { listen 127.0.0.1:%%PORT_status%%; edge_status; }
EOF
$t->backend('held', mode => 'hold');
$t->backend('web', mode => 'http');
$t->run;
my ($http, $tls, $status) = map { $t->port($_) } qw(http tls status);

sub get { Edge::Test::status_json($status, $_[0]) }
sub route { Edge::Test::route_counters($status, $_[0]) // {} }

sub refused {
    my ($name, $proto, $why) = @_;
    return route($name)->{$proto}{refused}{$why} // 0;
}

# Opens a connection for $host from $local (127.0.0.x) and waits for its first answer: the
# `held` backend's name (admitted, the connection is kept open) or the edge's refusal (an
# answer, or the connection closed: ''). Returns (socket, what arrived).
sub hold {
    my ($host, $local, $port, $bytes) = @_;
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1:' . ($port // $http),
        LocalAddr => $local // '127.0.0.1', Timeout => 10) or die "connect: $!\n";
    syswrite($s, $bytes // "GET / HTTP/1.1\r\nHost: $host\r\n\r\n");
    my $sel = IO::Select->new($s);
    my $got = '';
    my $deadline = time + 20;
    while (time < $deadline && $got !~ /^held|\r\n\r\n.*\n/s) {
        last unless $sel->can_read($deadline - time);
        sysread($s, my $buf, 4096) or last;
        $got .= $buf;
    }
    return ($s, $got);
}

# Waits until the route has $n connections open, all workers together.
sub open_now {
    my ($name, $n) = @_;
    wait_for(sub { (route($name)->{http}{active} // 0) == $n }, "$name to have $n open", 60);
}

# --- max_conns: 40 clients at once, each holding its connection: exactly 10 admitted,
# whichever of the 4 workers takes them.
require POSIX;
pipe(my $said, my $say) or die "pipe: $!\n";
pipe(my $until, my $release) or die "pipe: $!\n";
my @clients;
for (1 .. 40) {
    my $pid = fork // die "fork: $!\n";
    if (!$pid) {
        close $said;
        close $release;
        my ($s, $got) = hold('max.test');
        syswrite($say, ($got eq 'held' ? 'held' : $got =~ m{^HTTP/1\.1 429 } ? '429' : 'other') . "\n");
        sysread($until, my $x, 1);    # until the parent lets go
        POSIX::_exit(0);
    }
    push @clients, $pid;
}
close $say;
close $until;
my %got;
$got{$_}++ for map { chomp; $_ } map { scalar <$said> } 1 .. 40;
is($got{held}, 10, 'max_conns 10: 10 of 40 simultaneous connections admitted');
is($got{429}, 30, 'the other 30 answered 429');
open_now('max.test', 10);
is(refused('max.test', 'http', 'max_conns'), 30, 'the 30 refusals counted for the route');
close $release;
waitpid($_, 0) for @clients;
open_now('max.test', 0);

my (@held, @answers);
for (1 .. 11) {
    my ($s, $got) = hold('max.test');
    push @held, $s;
    push @answers, $got;
}
my @refusals = grep { $_ ne 'held' } @answers;
is(scalar @refusals, 1, 'one at a time: the 11th refused');
like($refusals[0] // '', qr{^HTTP/1\.1 429 Too Many Requests\r\n.*\r\n\r\nToo many connections to this host; retry later\.\n\z}s,
    'with 429 and a one-line body');
# One admitted connection ends: one more is admitted, and no other.
my ($first) = grep { $answers[$_] eq 'held' } 0 .. $#answers;
close $held[$first];
open_now('max.test', 9);
my ($again, $again_got) = hold('max.test');
my ($over, $over_got) = hold('max.test');
is($again_got, 'held', 'a freed place is taken again');
like($over_got, qr/^HTTP\/1\.1 429 /, 'and the 11th is refused again');
close $_ for @held, $again, $over;
open_now('max.test', 0);

# A table swap lowers the limit to 3: new connections get it.
$t->swap_routes('routes.json', table(max => 3), 4);
(@held, @answers) = ();
for (1 .. 5) {
    my ($s, $got) = hold('max.test');
    push @held, $s;
    push @answers, $got;
}
is(scalar(grep { $_ eq 'held' } @answers), 3, 'after a swap to max_conns 3: 3 of 5 admitted');
close $_ for @held;
open_now('max.test', 0);

# --- max_conns_per_client: 2 per client address, 3 addresses.
(@held, @answers) = ();
my %admitted;
for my $local (qw(127.0.0.1 127.0.0.2 127.0.0.3)) {
    for (1 .. 3) {
        my ($s, $got) = hold('per.test', $local);
        push @held, $s;
        $admitted{$local}++ if $got eq 'held';
    }
}
is_deeply(\%admitted, { '127.0.0.1' => 2, '127.0.0.2' => 2, '127.0.0.3' => 2 },
    'max_conns_per_client 2: 2 of 3 admitted for each of 3 addresses');
is(refused('per.test', 'http', 'max_conns_per_client'), 3, 'the 3 refusals counted');
is(get('/routes?top=0')->{clients}{in_use}, 3, '3 (route, client) pairs kept');
close $_ for @held;
open_now('per.test', 0);
wait_for(sub { get('/routes?top=0')->{clients}{in_use} == 0 }, 'the pairs to be released', 60);

# --- allow and deny lists.
my $ok = "HTTP/1.0 200 X\r\nContent-Length: 3\r\nConnection: close\r\n\r\nweb";
is(http_get($http, 'acl.test', local => '127.0.0.2'), $ok, 'allow: 127.0.0.2 admitted');
is(http_get($http, 'acl.test', local => '127.0.0.130'), $ok, 'allow: 127.0.0.130 (in a /25) admitted');
like(http_get($http, 'acl.test', local => '127.0.0.1'),
    qr{^HTTP/1\.1 403 Forbidden\r\n.*\r\n\r\nAccess to this host is denied\.\n\z}s,
    'not on the allow list: 403 with a one-line body');
like(http_get($http, 'acl.test', local => '127.0.0.200'), qr{^HTTP/1\.1 403 }, 'deny beats allow');
my $tls_hello = tls_records(client_hello(sni => 'tlsacl.test'));
my ($tls_ok, $tls_ok_got) = hold(undef, '127.0.0.2', $tls, $tls_hello);
is($tls_ok_got, 'held', 'a TLS client not denied is admitted');
my ($tls_no, $tls_no_got) = hold(undef, '127.0.0.1', $tls, $tls_hello);
is($tls_no_got, '', 'a refused TLS client: the connection closed, no byte');
close $_ for $tls_ok, $tls_no;
is(raw_exchange($tls, [tls_records(client_hello(sni => 'acl.test'))], local => '127.0.0.1'), '',
    'a TLS client off the allow list: closed');
is(refused('acl.test', 'http', 'denied'), 2, 'HTTP refusals counted as denied');
is(refused('acl.test', 'tls', 'denied'), 1, 'and the TLS one, under TLS');

# A connection admitted per client, the next refused by the rate: its pair is given back.
my ($both, $both_got) = hold('both.test');
my ($second, $second_got) = hold('both.test');
is($both_got, 'held', 'per client and rate: the first admitted');
like($second_got, qr{^HTTP/1\.1 429 }, 'the second refused by the rate');
is(refused('both.test', 'http', 'rate'), 1, 'counted as rate');
is(get('/routes?top=0')->{clients}{in_use}, 1, "the refused connection's pair given back");
close $_ for $both, $second;
wait_for(sub { get('/routes?top=0')->{clients}{in_use} == 0 }, 'the last pair to be released', 60);
is(refused('tlsacl.test', 'tls', 'denied'), 1, 'the TLS refusal counted under TLS');
like(http_get($http, 'guarded.test'), qr{^HTTP/1\.1 403 }, "an upstream's limits apply to its routes");
is(http_get($http, 'open.test'), $ok, "a route's own deny list replaces its upstream's");
is(http_get($http, 'free.test'), $ok, 'a route without limits is untouched');

# --- rate 50r/s burst 10, 4 client processes for 10 s: 50 x 10 + 11 admitted.
my $window = 10;
my @kids;
my $start = time;
for my $k (0 .. 3) {
    my $pid = fork // die "fork: $!\n";
    if (!$pid) {
        my ($yes, $no, $other, @at) = (0, 0, 0);
        while (time < $start + $window) {
            push @at, time;
            my $got = http_get($http, 'rate.test');
            if ($got eq $ok) { $yes++ } elsif ($got =~ m{^HTTP/1\.1 429 }) { $no++ } else { $other++ }
        }
        # Each client's own file: a long line through a shared pipe would interleave.
        $t->write_file("rate.$k", "$yes $no $other @at\n");
        POSIX::_exit(0);
    }
    push @kids, $pid;
}
waitpid($_, 0) for @kids;
my ($yes, $no, $other, @at) = (0, 0, 0);
for my $k (0 .. 3) {
    my ($y, $n, $o, @t) = split ' ', $t->read_file("rate.$k");
    ($yes, $no, $other) = ($yes + $y, $no + $n, $other + $o);
    push @at, @t;
}
@at = sort { $a <=> $b } @at;
my $span = $at[-1] - $at[0];
# Time in which no client was trying (a stalled machine): no connection could be admitted.
my $idle = 0;
for my $i (1 .. $#at) {
    my $gap = $at[$i] - $at[$i - 1];
    $idle += $gap - 0.02 if $gap > 0.02;
}
my $want = 50 * $span + 11;
my $least = 50 * ($span - $idle) + 11;
note(sprintf('rate: %d admitted, %d refused, %d other in %.2f s (%.2f s with no attempt; %.1f offered per second)',
    $yes, $no, $other, $span, $idle, ($yes + $no) / ($span || 1)));
is($other, 0, 'every attempt admitted or answered 429');
cmp_ok($yes, '<=', 1.1 * $want, "rate 50r/s burst 10: $yes admitted, at most $want + 10 %");
cmp_ok($yes, '>=', 0.9 * $least, "and at least $least - 10 % (the time clients were trying)");
my $r = route('rate.test')->{http};
is($r->{connections}, $yes, 'the admitted connections counted');
is($r->{refused}{rate}, $no, 'and every refusal, as rate');

# --- Logged once per interval per worker, never once per connection.
my $log = $t->read_file('error.log');
my @lines = $log =~ /^.*refused by route "rate\.test" \(http\): rate 50r\/s burst 10 exceeded.*$/mg;
cmp_ok(scalar @lines, '>=', 1, 'rate refusals logged');
cmp_ok(scalar @lines, '<=', 4 * (2 + int($span / 10)), scalar(@lines) . " lines for $no refusals");
like($log, qr/refused by route "max\.test" \(http\): max_conns 10 reached; 0 more refusal/,
    'the first refusal of a kind logged at once, with the client and the limit');
like($log, qr/ 127\.0\.0\.(?:1|200) refused by route "acl\.test" \(http\): the client's address is not allowed/,
    "a denied client's address in the line");
my @more = $log =~ /rate 50r\/s burst 10 exceeded; (\d+) more refusal/g;
my $told = @lines;
$told += $_ for @more;
cmp_ok($told, '<=', $no, 'the lines account for no more refusals than there were');

# --- /metrics.
my ($code, $metrics) = Edge::Test::status_get($status, '/metrics');
like($metrics, qr/^nginx_edge_route_refused_total\{route="rate\.test",match="exact",protocol="http",reason="rate"\} $no$/m,
    'per-route refusals in /metrics');
like($metrics, qr/^nginx_edge_refused_connections_total\{protocol="tls",reason="denied"\} 2$/m,
    'all refusals by protocol and reason');

# --- A bad limit: the file is rejected with where and why; the last good table serves on.
my $mark = length $t->read_file('error.log');
my $bad = table();
$bad =~ s/"burst":10/"burst":-1/ or die "no burst in the table\n";
$t->write_routes('routes.json', $bad);
wait_for(sub { substr($t->read_file('error.log'), $mark) =~ /routes\["rate\.test"\]\.limits\.burst: expected an integer from 0 to 1000000/ },
    'the bad limit to be reported', 60);
is(http_get($http, 'free.test'), $ok, 'the last good table still serves');

unlike($t->read_file('error.log'), qr/\[(alert|crit|emerg)\]/, 'nothing worse than an error');
done_testing;
