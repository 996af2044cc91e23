#!/usr/bin/perl
# Health: passive failures shared by two workers, active tcp/http/tls checks that follow a
# backend stopped and started again, state kept across a route-table reload and across
# nginx -s reload, and the edge_status JSON and Prometheus answers.

use strict;
use warnings;
use Test::More;
use Time::HiRes qw(time);
use Edge::Test qw(http_get raw_exchange wait_for);

my $t = Edge::Test->new;
my $dir = $t->dir;
$t->certificate('backend', 'backend.test');
# A certificate only for sni.test: a backend that picks its certificate by SNI fails any other.
$t->certificate('sni.test');

my $routes = <<'EOF';
{
  "upstreams": {
    "passive": {"servers": ["127.0.0.1:%%PORT_p1%%", "127.0.0.1:%%PORT_p2%%"],
                "max_fails": 1, "fail_timeout": "8s"},
    "tcp": {"servers": ["127.0.0.1:%%PORT_tcp1%%"],
            "check": {"type": "tcp", "interval": "500ms", "timeout": "400ms", "rise": 2, "fall": 3}},
    "http": {"servers": ["127.0.0.1:%%PORT_http1%%", "127.0.0.1:%%PORT_http503%%"],
             "check": {"type": "http", "path": "/healthz", "interval": "500ms", "timeout": "400ms",
                       "rise": 2, "fall": 3}},
    "tls": {"servers": ["127.0.0.1:%%PORT_tls1%%", "127.0.0.1:%%PORT_plain%%"],
            "check": {"type": "tls", "interval": "500ms", "timeout": "400ms", "rise": 2, "fall": 3}},
    "later": {"servers": ["127.0.0.1:%%PORT_late%%"], "start": "down",
              "check": {"type": "tcp", "interval": "300ms", "rise": 2}},
    "kept": {"servers": ["127.0.0.1:%%PORT_gone%%", "127.0.0.1:%%PORT_k2%%"], "fail_timeout": "60s"},
    "sni": {"servers": ["127.0.0.1:%%PORT_bysni%%", "127.0.0.1:%%PORT_tls12%%"],
            "check": {"type": "tls", "interval": "1s"}},
    "badsni": {"servers": ["127.0.0.1:%%PORT_bysni%%"],
               "check": {"type": "tls", "sni": "other.test", "interval": "1s", "fall": 1}},
    "once": {"servers": ["127.0.0.1:%%PORT_once%%"], "check": {"type": "tcp", "interval": "1h"}}
  },
  "routes": {
    "passive.test": "passive", "tcp.test": "tcp", "http.test": "http",
    "tls.test": "tls", "later.test": "later", "kept.test": "kept",
    "*.wild.test": "sni", "sni.test": "sni", "badsni.test": "badsni"%%EXTRA%%
  }
}
EOF
sub routes { my ($extra) = @_; (my $r = $routes) =~ s/%%EXTRA%%/$extra/; $r }
$t->write_routes('routes.json', routes(''));

$t->backend('p1');
$t->backend('tcp1');
$t->backend('http1', mode => 'http');
$t->backend('http503', mode => 'http', status => 503);
$t->backend('tls1', mode => 'tls', cert => "$dir/backend.crt", key => "$dir/backend.key");
$t->backend('plain');
$t->backend('once', log => 'once.log');
$t->config(<<'EOF', workers => 2);
    edge_routes %%TESTDIR%%/routes.json interval=100ms;
    edge_zone health 256k;
    server { listen 127.0.0.1:%%PORT_edge%% reuseport; edge_route http; proxy_pass $edge_upstream;
             proxy_connect_timeout 2s; }
    server { listen 127.0.0.1:%%PORT_status%%; edge_status; }
    server { listen 127.0.0.1:%%PORT_p2%%; return "p2"; }
    server { listen 127.0.0.1:%%PORT_k2%%; return "k2"; }
    server { listen 127.0.0.1:%%PORT_bysni%% ssl; ssl_certificate %%TESTDIR%%/$ssl_server_name.crt;
             ssl_certificate_key %%TESTDIR%%/$ssl_server_name.key; return "bysni"; }
    server { listen 127.0.0.1:%%PORT_tls12%% ssl; ssl_protocols TLSv1.2; return "tls12";
             ssl_certificate %%TESTDIR%%/backend.crt; ssl_certificate_key %%TESTDIR%%/backend.key; }
EOF
$t->run;
my $edge = $t->port('edge');
my $status = $t->port('status');
my ($p1, $tcp1) = ($t->port('p1'), $t->port('tcp1'));
my $state = sub { Edge::Test::server_state($status, @_) // {} };

# --- Passive: one refused connect takes p1 out for every worker; it comes back afterwards.
$t->stop_backend('p1');
is(http_get($edge, 'passive.test'), 'p2', 'a refused server is retried past') for 1 .. 2;
$t->wait_for_log(qr/upstream "passive" server 127\.0\.0\.1:$p1 is down: 1 connect failure\(s\) within 8000ms/);
my $mark = length $t->read_file('access.log');
my %got;
$got{http_get($edge, 'passive.test')}++ for 1 .. 20;
is_deeply(\%got, {p2 => 20}, 'every answer comes from the server that is up');
wait_for(sub { scalar(() = substr($t->read_file('access.log'), $mark) =~ /name=passive\.test/g) == 20 },
    'access log lines');
my @tried = substr($t->read_file('access.log'), $mark) =~ /(addr=\S*:$p1\b)/g;
is(scalar @tried, 0, 'neither worker tries the down server again (two workers, reuseport)');
is(scalar(() = $t->read_file('error.log') =~ /server 127\.0\.0\.1:$p1 is down/g), 1,
    'the transition is logged once, by the worker that made it');
is($state->('passive', "127.0.0.1:$p1")->{state}, 'down', 'status: down');
is($state->('passive', "127.0.0.1:$p1")->{why}, 'passive', 'status: why');

$t->backend('p1');
wait_for(sub { http_get($edge, 'passive.test') eq 'p1' }, 'p1 back after fail_timeout');
pass('traffic comes back once fail_timeout has passed and p1 answers');
$t->wait_for_log(qr/server 127\.0\.0\.1:$p1 is up: a connect succeeded after fail_timeout/);

# --- Active tcp check: down within fall x interval, up within rise x interval.
sub timed {
    my ($cond, $what) = @_;
    my $start = time;
    wait_for($cond, $what);
    return time - $start;
}
wait_for(sub { ($state->('tcp', "127.0.0.1:$tcp1")->{last_check} // {})->{result} }, 'first tcp check');
is($state->('tcp', "127.0.0.1:$tcp1")->{last_check}{result}, 'ok', 'tcp check passes');
$t->stop_backend('tcp1');
my $down = timed(sub { $state->('tcp', "127.0.0.1:$tcp1")->{state} eq 'down' }, 'tcp down');
note(sprintf 'tcp check: stopped -> down in %.2f s (fall 3 x 500ms)', $down);
cmp_ok($down, '<=', 1.5 + 2.5, 'down within fall x interval (plus 2.5 s for polling on a busy machine)');
my $s = $state->('tcp', "127.0.0.1:$tcp1");
is_deeply([$s->{why}, $s->{last_check}{result}], ['check', 'connection refused'], 'why and last result');
$t->wait_for_log(qr/upstream "tcp" server 127\.0\.0\.1:$tcp1 is down: tcp check failed 3 time\(s\) in a row, last: connection refused/);
$t->backend('tcp1');
my $up = timed(sub { $state->('tcp', "127.0.0.1:$tcp1")->{state} eq 'up' }, 'tcp up');
note(sprintf 'tcp check: restarted -> up in %.2f s (rise 2 x 500ms)', $up);
cmp_ok($up, '<=', 1.0 + 2.5, 'up within rise x interval (plus 2.5 s)');
is(http_get($edge, 'tcp.test'), 'tcp1', 'traffic reaches it again');
# (The record changes before the line is written.)
$t->wait_for_log(qr/server 127\.0\.0\.1:$tcp1 is up/);
my $probes_by = () = $t->read_file('error.log') =~ /server 127\.0\.0\.1:$tcp1 is up/g;
is($probes_by, 1, 'one up transition logged, though two workers run checks');

# --- Active http check: a 503 answer is down, a 200 one up; stop and start follow.
my ($h1, $h503) = ($t->port('http1'), $t->port('http503'));
wait_for(sub { $state->('http', "127.0.0.1:$h503")->{state} eq 'down' }, 'the 503 server down');
is($state->('http', "127.0.0.1:$h503")->{last_check}{result}, 'unexpected answer', '503 is not 2xx or 3xx');
is($state->('http', "127.0.0.1:$h1")->{state}, 'up', 'the 200 server is up');
is(http_get($edge, 'http.test'), 'HTTP/1.0 200 X' . "\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhttp1",
    'traffic goes to the healthy server only') for 1 .. 3;
$t->stop_backend('http1');
wait_for(sub { $state->('http', "127.0.0.1:$h1")->{state} eq 'down' }, 'http server down once stopped');
$t->backend('http1', mode => 'http');
wait_for(sub { $state->('http', "127.0.0.1:$h1")->{state} eq 'up' }, 'http server up once started');
pass('http check follows the server being stopped and started');

# --- Active tls check: a TLS server is up; one that does not speak TLS is down.
my ($tls1, $plain) = ($t->port('tls1'), $t->port('plain'));
wait_for(sub { $state->('tls', "127.0.0.1:$plain")->{state} eq 'down' }, 'non-TLS server down');
is($state->('tls', "127.0.0.1:$tls1")->{state}, 'up', 'the TLS server answers the ClientHello');
is($state->('tls', "127.0.0.1:$tls1")->{last_check}{result}, 'ok', 'with a ServerHello');
$t->stop_backend('tls1');
wait_for(sub { $state->('tls', "127.0.0.1:$tls1")->{state} eq 'down' }, 'TLS server down once stopped');
$t->backend('tls1', mode => 'tls', cert => "$dir/backend.crt", key => "$dir/backend.key");
wait_for(sub { $state->('tls', "127.0.0.1:$tls1")->{state} eq 'up' }, 'TLS server up once started');
pass('tls check follows the server being stopped and started');

# --- The tls check sends the first exact route's name as SNI, or its own `sni`; and it gets
# a ServerHello from a TLS 1.2-only server too.
my ($bysni, $tls12) = ($t->port('bysni'), $t->port('tls12'));
wait_for(sub { ($state->('sni', "127.0.0.1:$bysni")->{last_check} // {})->{result} }, 'sni checked');
is($state->('sni', "127.0.0.1:$bysni")->{state}, 'up', 'SNI sni.test: the backend has its certificate');
is(Edge::Test::status_json($status)->{upstreams}{sni}{check}{name}, 'sni.test', 'the name is the route\'s');
wait_for(sub { $state->('badsni', "127.0.0.1:$bysni")->{state} eq 'down' }, 'other.test fails');
is($state->('badsni', "127.0.0.1:$bysni")->{last_check}{result}, 'unexpected answer', 'an alert for other.test');
wait_for(sub { ($state->('sni', "127.0.0.1:$tls12")->{last_check} // {})->{result} }, 'tls12 checked');
is($state->('sni', "127.0.0.1:$tls12")->{last_check}{result}, 'ok', 'a TLS 1.2-only server answers');

# --- "start": "down": a new server takes no traffic until it has passed rise checks.
my $late = $t->port('late');
is($state->('later', "127.0.0.1:$late")->{why}, 'start down', 'a new server starts down');
$t->backend('late');
wait_for(sub { $state->('later', "127.0.0.1:$late")->{state} eq 'up' }, 'up after rise checks');
is(http_get($edge, 'later.test'), 'late', 'then it takes traffic');

# --- One probe per server per interval, whatever the number of workers (interval 1h here).
my $once = $t->port('once');
wait_for(sub { ($state->('once', "127.0.0.1:$once")->{last_check} // {})->{result} }, 'the first probe');
# Both workers keep ticking: wait until the tcp upstream has been probed twice more.
my $at = $state->('tcp', "127.0.0.1:$tcp1")->{last_check}{at};
wait_for(sub { $state->('tcp', "127.0.0.1:$tcp1")->{last_check}{at} >= $at + 1 }, 'two more tcp probes');
is($t->read_file('once.log'), "accept\n", 'two workers, one probe');

# --- Health and counters survive a route-table reload and nginx -s reload.
my $gone = $t->port('gone');
is(http_get($edge, 'kept.test'), 'k2', 'retried past a refused server');
wait_for(sub { $state->('kept', "127.0.0.1:$gone")->{state} eq 'down' }, 'gone is down');
my $total = $state->('kept', "127.0.0.1:$gone")->{total};
cmp_ok($total, '>=', 1, 'its connection was counted');
$t->write_routes('routes.json', routes(', "new.test": "kept"'));
$t->wait_for_log(qr/table 2 loaded/);
wait_for(sub { Edge::Test::status_json($status)->{sources}[0]{generation} == 2 }, 'generation 2 in status');
$s = $state->('kept', "127.0.0.1:$gone");
is_deeply([$s->{state}, $s->{why}, $s->{total}], ['down', 'passive', $total], 'kept across a table reload');
my $exited = () = $t->read_file('error.log') =~ /worker process \d+ exited with code 0/g;
$t->reload;
wait_for(sub { Edge::Test::status_json($status)->{sources}[0]{generation} == 1 }, 'new workers answer');
wait_for(sub { (() = $t->read_file('error.log') =~ /worker process \d+ exited with code 0/g) == $exited + 2 },
    'old workers exit');
pass('the old workers exit although their checks were running');
is($t->read_file('once.log'), "accept\n", 'the new workers do not probe before the interval is over');
$s = $state->('kept', "127.0.0.1:$gone");
is_deeply([$s->{state}, $s->{why}, $s->{total}], ['down', 'passive', $total], 'kept across nginx -s reload');
is(http_get($edge, 'kept.test'), 'k2', 'and the down server is not tried after the reload');

# --- Status: JSON fields, Prometheus text, errors.
my $st = Edge::Test::status_json($status);
is($st->{zone}{name}, 'health', 'zone name');
is($st->{zone}{used}, 14, 'one zone record per server of every upstream');
like($st->{sources}[0]{path}, qr{/routes\.json$}, 'source path');
cmp_ok($st->{sources}[0]{image_bytes}, '>', 1000, 'the compiled table\'s size');
ok($st->{sources}[0]{loaded_at} > 1e9, 'source load time');
is($st->{upstreams}{tcp}{check}{type}, 'tcp', 'check type');
is($st->{upstreams}{passive}{max_fails}, 1, 'max_fails');
my ($code, $metrics) = Edge::Test::status_get($status, '/metrics');
is($code, 200, '/metrics answers');
my (%type, $bad);
for my $line (split /\n/, $metrics) {
    if ($line =~ /^# TYPE (\w+) (gauge|counter|histogram)$/) { $type{$1} = $2; next }
    next if $line =~ /^# HELP \w+ .+$/;
    if ($line =~ /^(nginx_edge_\w+?)(_bucket|_sum|_count)?(?:\{((?:\w+="(?:[^"\\]|\\.)*",?)*)\})? (-?[0-9.e+]+)$/) {
        my $family = $type{$1 . ($2 // '')} ? $1 . ($2 // '') : $1;
        $bad = "sample before its TYPE: $line" unless $type{$family};
        $bad = "$2 of a $type{$family}: $line" if $2 && !$type{$1 . $2} && $type{$family} ne 'histogram';
        next;
    }
    $bad = "not exposition format: $line";
}
ok(!$bad, 'every /metrics line is Prometheus text exposition') or diag($bad);
like($metrics, qr/^nginx_edge_server_up\{upstream="tcp",server="127\.0\.0\.1:$tcp1"\} 1$/m, 'server_up sample');
like($metrics, qr/^nginx_edge_server_up\{upstream="kept",server="127\.0\.0\.1:$gone"\} 0$/m, 'a down server');
like($metrics, qr/^nginx_edge_server_connections_total\{upstream="kept",server="127\.0\.0\.1:$gone"\} $total$/m,
    'connection counter');
like($metrics, qr/^nginx_edge_routes_generation\{source="[^"]+routes\.json"\} 1$/m, 'generation');
is((Edge::Test::status_get($status, '/nope'))[0], 404, 'other paths: 404');
like(raw_exchange($status, ["POST / HTTP/1.1\r\n\r\n"]), qr{^HTTP/1\.1 405 }, 'other methods: 405');
like(raw_exchange($status, ["\x16\x03\x01\x00\x05hello\r\n\r\n"]), qr{^HTTP/1\.1 400 }, 'not HTTP: 400');

done_testing;
