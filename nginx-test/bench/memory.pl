# The measurement behind nginx-test/bench/memory.
use strict;
use warnings;
use Time::HiRes qw(sleep);
use Edge::Test qw(wait_for);

our ($routes, $swaps) = @ARGV;

sub kb {
    my ($pid, $field) = @_;
    open my $fh, '<', "/proc/$pid/smaps_rollup" or return 0;
    local $/;
    my ($kb) = <$fh> =~ /^$field:\s+(\d+) kB/m;
    return $kb // 0;
}

sub workers {
    my ($t) = @_;
    my $master = $t->pid;
    return grep { /^\d+$/ } split /\s+/, `ps -o pid= --ppid $master`;
}

sub table {
    my ($v) = @_;
    my $r = join ",\n", (map { qq{"n$_.example.com": "u"} } 0 .. $routes - 2), qq{"v$v.example.com": "u"};
    return qq({"upstreams": {"u": {"servers": ["127.0.0.1:%%PORT_b%%"]}}, "routes": {$r}});
}

# The PSS of all workers: at start, and (nginx-edge) once every worker serves a changed table.
sub measure {
    my ($kind, $workers, $n) = @_;
    my $t = Edge::Test->new;
    if ($kind eq 'edge') {
        local $routes = $n;
        $t->write_routes('routes.json', table(0));
        $t->config(<<'CONF', workers => $workers);
    edge_routes %%TESTDIR%%/routes.json interval=200ms;
    server { listen 127.0.0.1:%%PORT_edge%%; edge_route tls; proxy_pass $edge_upstream; }
CONF
    } else {
        my $map = join '', map { "        n$_.example.com b;\n" } 0 .. $n - 1;
        $t->config(<<"CONF", workers => $workers);
    map_hash_max_size 1048576; map_hash_bucket_size 128;
    map \$ssl_preread_server_name \$backend {
$map    }
    upstream b { server 127.0.0.1:%%PORT_b%%; }
    server { listen 127.0.0.1:%%PORT_edge%%; ssl_preread on; proxy_pass \$backend; }
CONF
    }
    my $conf = $t->read_file('nginx.conf');
    $conf =~ s/access_log \S+ edge;/access_log off;/;
    $t->write_file('nginx.conf', $conf);
    $t->run;
    my @w;
    wait_for(sub { @w = workers($t); @w == $workers }, 'workers');
    # Let start-up settle.
    sleep 1;
    my $pss = 0;
    $pss += kb($_, 'Pss') for @w;
    my $changed = 0;
    if ($kind eq 'edge') {
        local $routes = $n;
        $t->write_routes('routes.json', table(1));
        wait_for(sub { (() = $t->read_file('error.log') =~ /table 2 in service/g) == $workers }, 'every worker swapped');
        # Let the retired table go.
        sleep 2;
        $changed += kb($_, 'Pss') for @w;
    }
    $t->stop;
    return ($pss, $changed);
}

printf "%d routes; PSS of all workers, MB (route memory = with routes - without)\n\n", $routes;
printf "| %-12s | %7s | %12s | %15s | %12s | %21s |\n", 'proxy', 'workers', 'with routes', 'without routes',
    'route memory', 'after a change';
printf "|%s|\n", join '|', map { '-' x ($_ + 2) } 12, 7, 12, 15, 12, 21;
for my $kind ('edge', 'map') {
    for my $workers (1, 2, 4) {
        my ($with, $changed) = measure($kind, $workers, $routes);
        my ($without, $changed_without) = measure($kind, $workers, 1);
        printf "| %-12s | %7d | %12.1f | %15.1f | %12.1f | %21s |\n", $kind eq 'edge' ? 'nginx-edge' : 'nginx map',
            $workers, $with / 1024, $without / 1024, ($with - $without) / 1024,
            $kind eq 'edge' ? sprintf('%.1f', ($changed - $changed_without) / 1024) : '-';
    }
}

# RSS of one worker over many swaps of the table.
my $t = Edge::Test->new;
$t->write_routes('routes.json', table(0));
$t->config(<<'CONF');
    edge_routes %%TESTDIR%%/routes.json interval=100ms;
    server { listen 127.0.0.1:%%PORT_edge%%; edge_route tls; proxy_pass $edge_upstream; }
CONF
my $conf = $t->read_file('nginx.conf');
$conf =~ s/error_log (\S+) info;/error_log $1 notice;/;
$t->write_file('nginx.conf', $conf);
$t->run;
my ($w) = workers($t);
my %rss;
for my $swap (1 .. $swaps) {
    $t->write_routes('routes.json', table($swap));
    my $g = $swap + 1;
    $t->wait_for_log(qr/table $g in service/);
    if ($swap == 1 || $swap % 25 == 0) {
        # The replaced table is freed (and the pages given back) on an idle-priority thread.
        sleep 2;
        $rss{$swap} = kb($w, 'Rss');
    }
}
print "\nworker RSS over $swaps swaps, MB: ", join(', ', map { "after $_: " . sprintf('%.1f', $rss{$_} / 1024) } sort { $a <=> $b } keys %rss), "\n";
printf "after %d swaps / after 1: %.2f\n", $swaps, $rss{$swaps} / $rss{1};
