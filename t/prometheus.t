#!/usr/bin/perl
# A real Prometheus (Debian's) scrapes a running edge under traffic: `promtool check metrics`
# accepts /metrics, `promtool check rules` the alert rules, and every PromQL expression of the
# Grafana dashboard's panels and of the alert rules returns data through Prometheus's HTTP API
# (the traffic makes each alert's condition true: a source failing, an upstream with no
# server up, a rejected route table, unrouted names, failing connects).

use strict;
use warnings;
use Test::More;
use JSON::PP;
use IPC::Open3;
use HTTP::Tiny;
use Edge::Test qw(http_get wait_for);
use Edge::FakeKube;

my $promtool = `command -v promtool 2>/dev/null`;
plan skip_all => 'prometheus is not installed (apt-get install prometheus)' unless $promtool;
chomp $promtool;
(my $prometheus = $promtool) =~ s/promtool$/prometheus/;

my $top = "$ENV{PWD}";
my $rules = "$top/docs/monitoring/alerts.yml";
my $dashboard = "$top/docs/monitoring/grafana-dashboard.json";
-f $rules && -f $dashboard or BAIL_OUT("run from the repository's top folder");

my $t = Edge::Test->new;
my $kube = Edge::FakeKube->new($t, 'a');
$kube->apply(Edge::FakeKube::ingress('web', 'shop', hosts => ['kube.test']));
$kube->start;
my $url = $kube->url;
my $gone = $t->port('gone');    # a URL source nobody answers
my $dead = $t->port('dead');
$t->write_routes('routes.json', encode_json({
    upstreams => {
        up => { servers => ['127.0.0.1:' . $t->port('back')] },
        dead => { servers => ["127.0.0.1:$dead"],
                  check => { type => 'tcp', interval => '500ms', timeout => '200ms', fall => 1 } },
    },
    routes => { 'shop.test' => 'up', 'dead.test' => 'dead',
                'limited.test' => { upstream => 'up', limits => { deny => ['all'] } } },
    default => 'up',
}));
$t->config(<<"EOF", workers => 2);
    edge_routes %%TESTDIR%%/routes.json interval=100ms;
    edge_routes_url $url name=cluster-a format=k8s upstream=up interval=1s timeout=2s;
    edge_routes_url http://127.0.0.1:$gone/edge.json name=gone format=edge interval=1s timeout=1s;
    edge_state %%TESTDIR%%/state;
    server { listen 127.0.0.1:%%PORT_edge%%; edge_route http; proxy_pass \$edge_upstream;
             proxy_next_upstream off; }
    server { listen 127.0.0.1:%%PORT_status%%; edge_status; }
    server { listen 127.0.0.1:%%PORT_back%%; return "x"; }
EOF
$t->run;
my ($edge, $status) = ($t->port('edge'), $t->port('status'));

# Prometheus: scrapes the edge every second and evaluates the rules.
my $prom = $t->port('prom');
my $dir = $t->dir;
$t->write_file('prometheus.yml', <<"EOF");
global: { scrape_interval: 1s, evaluation_interval: 1s }
rule_files: [ "$rules" ]
scrape_configs:
  - job_name: edge
    static_configs: [ { targets: [ "127.0.0.1:$status" ] } ]
EOF
my $pid = fork // die "fork: $!\n";
if (!$pid) {
    open STDOUT, '>', "$dir/prometheus.log";
    open STDERR, '>&', \*STDOUT;
    { exec $prometheus, "--config.file=$dir/prometheus.yml", "--storage.tsdb.path=$dir/tsdb",
        "--web.listen-address=127.0.0.1:$prom", '--log.level=warn' }
    POSIX::_exit(127);
}
require POSIX;
END { if ($pid) { kill 'TERM', $pid; waitpid($pid, 0) } }

my $http = HTTP::Tiny->new(timeout => 10);
sub api {
    my ($path) = @_;
    my $r = $http->get("http://127.0.0.1:$prom$path");
    return $r->{success} ? decode_json($r->{content}) : { status => $r->{status}, error => $r->{content} };
}

sub query {
    my ($expr) = @_;
    (my $q = $expr) =~ s/([^A-Za-z0-9_.~-])/sprintf('%%%02X', ord $1)/ge;
    return api("/api/v1/query?query=$q");
}

wait_for(sub { my $r = query('up{job="edge"}'); ($r->{data}{result}[0]{value}[1] // '') eq '1' },
    'Prometheus to scrape the edge', 60);
pass('Prometheus scrapes the edge');

# Traffic, in two rounds a few scrapes apart so that every rate() has an increase.
wait_for(sub { http_get($edge, 'kube.test') eq 'x' }, 'the Kubernetes route');
for my $round (1, 2) {
    http_get($edge, 'shop.test') for 1 .. 100;
    http_get($edge, 'dead.test') for 1 .. 100;
    http_get($edge, 'limited.test') for 1 .. 100;    # refused by the route's limits
    http_get($edge, "nobody$_.test") for 1 .. 400;
    http_get($edge, 'typo.test') for 1 .. 20;    # a name that gets a series of its own
    http_get($edge, undef, version => '1.0') for 1 .. 5;
    my $n = query('count_over_time(up{job="edge"}[1h])')->{data}{result}[0]{value}[1] // 0;
    wait_for(sub { (query('count_over_time(up{job="edge"}[1h])')->{data}{result}[0]{value}[1] // 0) >= $n + 3 },
        'three more scrapes', 60);
}
# A change that does not validate: the table keeps serving, and says so.
$t->write_routes('routes.json', '{"routes": {"broken.test": "nowhere"}}');
wait_for(sub { (query('nginx_edge_routes_last_load_failed')->{data}{result}[0]{value}[1] // '') eq '1' },
    'the rejected change to reach Prometheus', 60);

# /metrics as promtool reads it.
my ($code, $metrics) = Edge::Test::status_get($status, '/metrics');
is($code, 200, '/metrics answers');
my $check = open3(my $in, my $out, undef, $promtool, 'check', 'metrics');
print {$in} $metrics;
close $in;
my $said = do { local $/; <$out> } // '';
waitpid($check, 0);
is($? >> 8, 0, 'promtool check metrics accepts /metrics') or diag($said);
my $rules_out = `$promtool check rules $rules 2>&1`;
is($? >> 8, 0, 'promtool check rules accepts the alert rules') or diag($rules_out);

# Every expression of the dashboard and of the rules returns data.
my $dash = decode_json(do { local $/; open my $f, '<', $dashboard or die "$dashboard: $!\n"; <$f> });
is($dash->{templating}{list}[0]{type}, 'datasource', 'the dashboard has a datasource variable');
my @exprs;
for my $p (@{$dash->{panels}}) {
    next if $p->{type} eq 'row';
    is($p->{datasource}{uid}, '${datasource}', "panel '$p->{title}' uses the datasource variable");
    push @exprs, map { ["panel '$p->{title}'", $_->{expr}] } @{$p->{targets}};
}
my @alerts;
{
    # The rules file's expressions, read as YAML's folded and plain scalars are written here.
    open my $f, '<', $rules or die "$rules: $!\n";
    my ($alert, $expr, $folding);
    while (my $line = <$f>) {
        if ($line =~ /^\s+- alert: (\S+)/) { $alert = $1; next }
        if ($line =~ /^(\s+)expr: >-\s*$/) { $expr = ''; $folding = length($1) + 2; next }
        if ($line =~ /^\s+expr: (.+)$/) { push @alerts, [$alert, $1]; next }
        if (defined $expr) {
            if ($line =~ /^\s{$folding}/) { chomp $line; $line =~ s/^\s+//; $expr .= " $line"; next }
            push @alerts, [$alert, $expr];
            undef $expr;
        }
    }
}
is(scalar @alerts, 6, 'six alert rules read');
push @exprs, map { ["alert $_->[0]", $_->[1]] } @alerts;
for my $e (@exprs) {
    my ($what, $expr) = @$e;
    # Windows as wide as the test's traffic; a value must be a number (a quantile of no
    # traffic is NaN). The surge alert's baseline (the hour before) has no data in a fresh
    # Prometheus: its first part is what fires here.
    (my $q = $expr) =~ s/\$__rate_interval/5m/g;
    my $r;
    my $ok = eval {
        wait_for(sub {
            $r = query($q);
            grep { ($_->{value}[1] // 'NaN') !~ /NaN|Inf/ } @{$r->{data}{result} // []};
        }, "$what to return data", 30);
        1;
    };
    ok($ok, "$what returns data: $expr") or diag(encode_json($r // {}));
}
unlike($t->read_file('error.log'), qr/\[(alert|crit|emerg)\]/, 'nothing worse than an error');
done_testing;
